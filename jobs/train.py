"""`ray job submit ... -- python jobs/train.py --config CONFIG ...`: `longcat-ray train` on the cluster the job runs on.

Thin: the job's driver connects to the cluster through RAY_ADDRESS (set by Ray's job supervisor) and runs the
same library call as the CLI; `python jobs/train.py --help` lists the flags.
"""

import sys
from pathlib import Path

# The job's working_dir is the repository root; make its package importable however the job was started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longcat_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

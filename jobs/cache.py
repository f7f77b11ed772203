"""`ray job submit ... -- python jobs/cache.py --config CONFIG ...`: `longcat-ray cache` on the cluster the job runs on.

Thin: the job's driver connects to the cluster through RAY_ADDRESS (set by Ray's job supervisor) and runs the
same library call as the CLI; `python jobs/cache.py --help` lists the flags.
"""

import sys
from pathlib import Path

# The job's working_dir is the repository root; make its package importable however the job was started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longcat_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))

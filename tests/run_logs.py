"""What a training run leaves under a local output_dir, read by the tests that kill, stop and resume runs."""

import json
import os


def samples_log(out, rank=0) -> list[dict]:
    """logs/samples-rank<rank>.jsonl: one line per micro-step the rank trained (its sample ids)."""
    with open(os.path.join(out, "logs", f"samples-rank{rank}.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def committed(out) -> int:
    """Checkpoints Ray Train's controller has recorded for the run (a worker's save counts once it is recorded:
    a worker lost before that rewinds to the checkpoint before)."""
    try:
        return len(json.loads((out / "run" / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0

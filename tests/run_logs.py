"""What a training run leaves under its output_dir, read by the tests that kill, stop, starve and resume runs."""

import json
import os
import re

from longcat_ray.run_record import SNAPSHOT

CHECKPOINT_NAME = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d+")  # Ray's checkpoint_<timestamp>


def samples_log(out, rank=0) -> list[dict]:
    """logs/samples-rank<rank>.jsonl: one line per micro-step the rank trained (its sample ids)."""
    with open(os.path.join(out, "logs", f"samples-rank{rank}.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def recorded(snapshot: str | bytes) -> list[str]:
    """The names of the checkpoints a Ray Train run record lists ([] for one cut short or empty)."""
    try:
        entries = json.loads(snapshot)["checkpoint_results"]
    except ValueError:
        return []
    return sorted({CHECKPOINT_NAME.search(json.dumps(entry))[0] for entry in entries})


def recorded_under(run) -> list[str]:
    """The paths of the checkpoints the record of the local run folder `run` lists ([] before it is written)."""
    try:
        return [str(run / name) for name in recorded((run / SNAPSHOT).read_text())]
    except OSError:
        return []


def committed(out) -> int:
    """Checkpoints Ray Train's controller has recorded for the run (a worker's save counts once it is recorded:
    a worker lost before that rewinds to the checkpoint before)."""
    return len(recorded_under(out / "run"))


def rewinds(out, rank: int = 0) -> int:
    """How often the samples log of `rank` goes back to an earlier micro-step (a restart from a checkpoint)."""
    steps = [line["micro_step"] for line in samples_log(out, rank)]
    return sum(later <= earlier for earlier, later in zip(steps, steps[1:]))


# Ray's INFO lines a run prints only with LONGCAT_RAY_VERBOSE=1 (each dataset's start, plan and end; Train's resource
# asks and reports; ray.init's connecting line)
RAY_INFO = ("Starting execution of Dataset", "Execution plan of Dataset", "TrainingReport(", "Requesting resources",
            "Started training worker group", "Connecting to existing Ray cluster", "Started a local Ray instance")


def ray_info_lines(output: str) -> list[str]:
    """The lines of a command's output that are Ray's INFO chatter (RAY_INFO)."""
    return [line for line in output.splitlines() if any(marker in line for marker in RAY_INFO)]

"""What makes a checkpoint safe to resume from, when Ray Train's own record of a run cannot say.

Ray Train records a run's checkpoints in `run/checkpoint_manager_snapshot.json` and resumes from the newest it
lists. It rewrites that file in place: a disk that fills while it writes leaves it empty, and Ray then refuses to
start the run again ("CheckpointManagerInitializationError: Expecting value"), so the same command could never
resume (found by tests/test_training.py's full-disk test, Ray 2.60). So each rank also writes, into every
checkpoint, a manifest of its files and their sizes; a checkpoint is whole when every rank's manifest is there and
every file it names has its size. With Ray's record unreadable, `recover` sets it aside (nothing is deleted) and
names the newest whole checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time

from longcat_ray.storage import filesystem, join

SNAPSHOT = "checkpoint_manager_snapshot.json"


def manifest_name(rank: int) -> str:
    return f"files-rank{rank}.json"


def write_manifest(directory: str, rank: int, world: int, step: int) -> None:
    """Into a checkpoint being made in the local `directory`: this rank's files (relative path -> bytes)."""
    files = {}
    for dirpath, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, directory)] = os.path.getsize(path)
    with open(os.path.join(directory, manifest_name(rank)), "w") as handle:
        json.dump({"world": world, "step": step, "files": files}, handle)


def whole_step(fs, checkpoint: str) -> int | None:
    """The step of the checkpoint at `checkpoint` (a path in `fs`) when every rank's files are there at their size,
    else None."""
    try:
        first = json.loads(fs.cat_file(join(checkpoint, manifest_name(0))))
        for rank in range(first["world"]):
            manifest = first if rank == 0 else json.loads(fs.cat_file(join(checkpoint, manifest_name(rank))))
            for relative, size in manifest["files"].items():
                if fs.size(join(checkpoint, relative)) != size:
                    return None
    except (OSError, ValueError, KeyError):  # a manifest or file missing (FileNotFoundError is an OSError)
        return None
    return first["step"]


def readable(fs, path: str) -> bool:
    try:
        json.loads(fs.cat_file(path))
    except ValueError:
        return False
    return True


def recover(output_dir: str, run: str) -> str | None:
    """When output_dir/run holds a Ray record that is not readable JSON: set it aside and -> the newest whole
    checkpoint's path (None: none is whole, the run starts over). A readable record, or none: None (Ray resumes as
    it records)."""
    fs, root = filesystem(output_dir)
    record = join(root, run, SNAPSHOT)
    if not fs.exists(record) or readable(fs, record):
        return None
    aside = f"{record}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    fs.mv(record, aside)
    # Ray names them checkpoint_<timestamp>: newest first
    checkpoints = sorted((p for p in fs.ls(join(root, run), detail=False) if posixpath.basename(p).startswith("checkpoint_")),
                         reverse=True)
    for checkpoint in checkpoints:
        step = whole_step(fs, checkpoint)
        if step is not None:
            print(f"ray: {record} (Ray Train's record of this run's checkpoints) was not readable (a disk that filled "
                  f"while Ray rewrote it leaves it empty); kept as {aside}. Resuming from {checkpoint}, the newest "
                  f"checkpoint stored whole (step {step}).", file=sys.stderr, flush=True)
            return checkpoint
    print(f"ray: {record} (Ray Train's record of this run's checkpoints) was not readable; kept as {aside}. No "
          f"checkpoint under {join(root, run)} is stored whole, so the run starts from step 0.", file=sys.stderr, flush=True)
    return None

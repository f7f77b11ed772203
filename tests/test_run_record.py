"""run_record.py: which checkpoint is whole when Ray Train's record of a run cannot be read."""

import json

from longcat_ray.run_record import SNAPSHOT, recover, whole_step, write_manifest
from longcat_ray.storage import filesystem


def make_checkpoint(run, name: str, step: int, world: int = 2):
    """A checkpoint as two ranks store it: each rank's files and its manifest."""
    for rank in range(world):
        local = run / f"{name}-rank{rank}"
        (local / "zero").mkdir(parents=True)
        (local / "zero" / f"optim-rank{rank}.pt").write_bytes(bytes(100 + rank))
        write_manifest(str(local), rank, world, step)
        for path in local.rglob("*"):
            if path.is_file():
                target = run / name / path.relative_to(local)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return run / name


def test_the_newest_whole_checkpoint_is_resumed_when_the_record_is_unreadable(tmp_path, capsys):
    run = tmp_path / "run"
    whole = make_checkpoint(run, "checkpoint_2026-12-02_10-00-00.000001", step=4)
    cut = make_checkpoint(run, "checkpoint_2026-12-02_10-05-00.000001", step=8)
    (cut / "zero" / "optim-rank1.pt").write_bytes(b"short")  # stored partly
    fs, _ = filesystem(str(tmp_path))
    assert whole_step(fs, str(whole)) == 4 and whole_step(fs, str(cut)) is None
    (run / SNAPSHOT).write_bytes(b"")
    assert recover(str(tmp_path), "run") == str(whole)
    assert "Resuming from" in capsys.readouterr().err
    assert not (run / SNAPSHOT).exists() and len(list(run.glob(f"{SNAPSHOT}.unreadable-*"))) == 1


def test_a_missing_rank_makes_a_checkpoint_incomplete(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "run", "checkpoint_2026-12-02_10-00-00.000001", step=4)
    (checkpoint / "files-rank1.json").unlink()
    fs, _ = filesystem(str(tmp_path))
    assert whole_step(fs, str(checkpoint)) is None


def test_a_readable_record_is_left_to_ray(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, "checkpoint_2026-12-02_10-00-00.000001", step=4)
    (run / SNAPSHOT).write_text(json.dumps({"checkpoint_results": []}))
    assert recover(str(tmp_path), "run") is None
    assert (run / SNAPSHOT).exists()
    assert recover(str(tmp_path / "elsewhere"), "run") is None  # no record at all: a fresh run

"""Epoch planning: bucket-pure batches, exact coverage across shards, reproducible for a seed."""

import pytest

from longcat_ray.reader import plan_epoch, planned_batches


def samples(n_by_bucket: dict, repeats: int = 0) -> list:
    out = []
    for (w, h), n in n_by_bucket.items():
        out += [{"sample_id": f"{w}x{h}/{i}", "bucket_w": w, "bucket_h": h, "repeats": repeats} for i in range(n)]
    return out


@pytest.mark.parametrize("world,batch", [(1, 1), (2, 2), (3, 4), (4, 3), (8, 2)])
def test_shards_cover_each_sample_once_with_pure_buckets(world, batch):
    data = samples({(128, 128): 11, (192, 128): 7, (128, 192): 5})
    plan = plan_epoch(data, batch, world, seed=1, epoch=0)
    assert len(plan) == world and len({len(r) for r in plan}) == 1  # every rank steps equally often
    seen = [s["sample_id"] for rank in plan for b in rank for s in b]
    assert sorted(seen) == sorted(s["sample_id"] for s in data)
    for rank in plan:
        for b in rank:
            assert 1 <= len(b) <= batch and len({(s["bucket_w"], s["bucket_h"]) for s in b}) == 1


def test_reproducible_for_a_seed_and_different_across_epochs():
    data = samples({(128, 128): 20, (192, 128): 12})
    ids = lambda plan: [[s["sample_id"] for s in b] for r in plan for b in r]  # noqa: E731
    assert ids(plan_epoch(data, 4, 2, 7, 0)) == ids(plan_epoch(data, 4, 2, 7, 0))
    assert ids(plan_epoch(data, 4, 2, 7, 0)) != ids(plan_epoch(data, 4, 2, 7, 1))
    assert ids(plan_epoch(data, 4, 2, 7, 0)) != ids(plan_epoch(data, 4, 2, 8, 0))


def test_repeats_and_tiny_datasets():
    plan = plan_epoch(samples({(128, 128): 3}, repeats=1), 2, 1, 0, 0)
    assert sum(len(b) for b in plan[0]) == 6
    # fewer single-sample batches than ranks: batches repeat so every rank still steps
    plan = plan_epoch(samples({(128, 128): 1}), 1, 2, 0, 0)
    assert [len(r) for r in plan] == [1, 1]


def test_an_edit_with_several_references_trains_one_per_epoch():
    """SimpleTuner's conditioning_multidataset_sampling `random`: 6 edits x 2 reference sets -> 6 samples an epoch."""
    data = [{"sample_id": f"e/{i}@{ref}", "group": f"e/{i}", "bucket_w": 128, "bucket_h": 128, "repeats": 0}
            for i in range(6) for ref in ("r1", "r2")]
    picked = []
    for epoch in range(8):
        plan = plan_epoch(data, 2, 1, seed=3, epoch=epoch)
        seen = [s for b in plan[0] for s in b]
        assert sorted(s["group"] for s in seen) == [f"e/{i}" for i in range(6)]  # each edit once
        picked += [s["sample_id"] for s in seen]
    assert {p.rsplit("@", 1)[1] for p in picked} == {"r1", "r2"}  # both reference sets get trained
    assert [s["sample_id"] for b in plan_epoch(data, 2, 1, 3, 5)[0] for s in b] == \
           [s["sample_id"] for b in plan_epoch(data, 2, 1, 3, 5)[0] for s in b]  # reproducible


def test_a_group_of_one_plans_as_before():
    """Single-reference datasets (group = sample id, or an older manifest without groups) keep their plans: the
    expected plan was printed by plan_epoch as it was before groups existed (commit 8fc3239)."""
    before = [[["192x128/1"], ["128x128/2", "128x128/0"], ["192x128/0"]],
              [["192x128/2"], ["128x128/4", "128x128/1"], ["128x128/3"]]]
    data = samples({(128, 128): 5, (192, 128): 3})
    ids = lambda plan: [[[s["sample_id"] for s in b] for b in r] for r in plan]  # noqa: E731
    assert ids(plan_epoch(data, 2, 2, 5, 1)) == before
    assert ids(plan_epoch([{**s, "group": s["sample_id"]} for s in data], 2, 2, 5, 1)) == before


@pytest.mark.parametrize("start,stop", [(0, 15), (4, 9), (5, 5), (7, 30)])
def test_a_runs_batches_are_its_epochs_plans_one_after_another(start, stop):
    """What one reader pipeline reads for micro-steps start..stop-1: epoch after epoch, each its own plan, from any
    micro-step (a resumed run) on. (10 samples, batch 2, world 2: 3 batches a rank each epoch.)"""
    data = samples({(128, 128): 6, (192, 128): 4})
    for rank in (0, 1):
        epochs = [b for epoch in range(11) for b in plan_epoch(data, 2, 2, 5, epoch)[rank]]
        assert planned_batches(data, 2, 2, 5, rank, start, stop) == epochs[start:stop]


def test_a_reader_that_yields_nothing_stops_the_wait_with_the_explanation():
    import time

    from longcat_ray.reader import ReaderStalled, prefetch

    def starved():
        yield ["s0"], {}
        time.sleep(30)  # never hands over a second batch within the timeout
        yield ["s1"], {}

    batches = prefetch(starved(), stall_timeout_s=0.5, explain=lambda: "waited 0.5 s on nothing")
    assert next(batches)[0] == ["s0"]
    with pytest.raises(ReaderStalled, match=r"no batch for 0.5 s \(stall_timeout_s\)\. waited 0.5 s on nothing"):
        next(batches)


def test_the_stall_report_names_what_waits_for_resources(ray_local):
    """A task that asks for a resource no node has, as a starved reader's tasks do: the report names it and its
    demand (Ray's state API on the session's local Ray)."""
    import time

    import ray

    from longcat_ray.reader import stall_report

    @ray.remote(resources={"longcat_test_missing": 1}, num_cpus=0)
    def starved_read():
        return 0

    pending = starved_read.remote()
    try:
        for _ in range(60):  # task states reach the state API within a few seconds
            report = stall_report()
            if "longcat_test_missing" in report:
                break
            time.sleep(1)
        assert "task starved_read needs" in report and "longcat_test_missing" in report, report
        assert "Free now:" in report and "Fix:" in report
    finally:
        ray.cancel(pending, force=True)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_a_damaged_cache_entry_never_reaches_a_training_step(tmp_path, damage):
    """`load_batch` is how every cached batch reaches training (shard_dataset maps it): an entry with a flipped byte,
    cut short, gone, or holding another sample's tensors under a valid checksum of its own is refused with its URL
    and the fix, never turned into tensors; the intact batch loads."""
    import json
    from pathlib import Path

    import torch

    from longcat_ray.cache import serialize_entry
    from longcat_ray.reader import load_batch

    def write(name: str, sample_id: str, seed: int) -> str:
        path = tmp_path / f"{name}.safetensors"
        latents = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(seed))
        path.write_bytes(serialize_entry({"latents": latents}, sample_id))
        return str(path)

    member = {"sample_id": "a/0", "dataset_id": "a", "ref_dataset_id": "a",
              "entries": {"edit": write("edit", "a/0", 0), "ref": write("ref", "a/0", 1)}}
    other = write("other", "b/7", 2)  # a valid entry of another sample
    row = {"index": 0, "members": json.dumps([member])}
    options = {"a": {}, "text": {}}
    assert json.loads(load_batch(row, options)["edit_shape"]) == [1, 16, 4, 4]  # intact: loads
    victim = tmp_path / "edit.safetensors"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "delete":
        victim.unlink()
    else:  # a valid entry of another sample copied over this one's name (its checksum is its own, and right)
        victim.write_bytes(Path(other).read_bytes())
    with pytest.raises(RuntimeError, match=rf"cache entry {victim} \(sample a/0\) is missing, corrupt or another sample's: re-run `longcat-ray cache`"):
        load_batch(row, options)

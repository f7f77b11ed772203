"""The training-side reader: bucket-pure batches over the cache, sharded across training workers.

The plan of an epoch is a pure function of (manifest, batch size, world size, seed, epoch): every rank
computes the same plan and takes its own share, so the order is reproducible and a resumed run skips
exactly the batches already trained. Each rank streams its batches through a Ray Data dataset that reads
and stacks the entries.
"""

from __future__ import annotations

import itertools
import json
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from longcat_ray.arrays import tensor_from_bytes, tensor_to_bytes
from longcat_ray.cache import ENTRY_KINDS, STREAM_KEYS, CachePlan, entry_tensor, require_entry



def one_per_edit(samples: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """Pairs of one edit with several references (`group`) -> one of them, drawn for this epoch (SimpleTuner's
    `conditioning_multidataset_sampling: random`). Samples without a group stand alone."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for sample in sorted(samples, key=lambda s: s["sample_id"]):
        groups.setdefault(sample.get("group") or sample["sample_id"], []).append(sample)
    return [members[0] if len(members) == 1 else rng.choice(members) for _, members in sorted(groups.items())]


def expand_repeats(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each sample `repeats + 1` times (SimpleTuner's `repeats` counts the extra passes)."""
    return [s for s in samples for _ in range(int(s.get("repeats", 0)) + 1)]


def split_largest(batches: list[list[dict[str, Any]]]) -> bool:
    """Split the largest batch in two; False when every batch is a single sample."""
    index = max(range(len(batches)), key=lambda i: len(batches[i]))
    batch = batches[index]
    if len(batch) < 2:
        return False
    half = len(batch) // 2
    batches[index : index + 1] = [batch[:half], batch[half:]]
    return True


def plan_epoch(
    samples: list[dict[str, Any]], batch_size: int, world_size: int, seed: int, epoch: int
) -> list[list[list[dict[str, Any]]]]:
    """-> per rank, its list of batches for this epoch. Every batch shares one bucket.

    An edit paired with several references trains one of them, drawn per epoch (`one_per_edit`). Samples are
    shuffled within their bucket, chunked, and the batches shuffled; the count is made a multiple
    of the world size by splitting the largest batches (so each sample is seen exactly once and every rank
    steps equally often), or, only when every batch already is one sample, by repeating batches.
    """
    rng = random.Random(f"{seed}:{epoch}")
    buckets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for sample in sorted(expand_repeats(one_per_edit(samples, rng)), key=lambda s: s["sample_id"]):
        buckets.setdefault((int(sample["bucket_w"]), int(sample["bucket_h"])), []).append(sample)
    batches = []
    for key in sorted(buckets):
        members = buckets[key]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    while len(batches) % world_size and split_largest(batches):
        pass
    for repeat in range(-len(batches) % world_size):
        batches.append(batches[repeat])
    return [batches[rank::world_size] for rank in range(world_size)]


SEGMENT = 4096
"""Micro-steps one reader pipeline serves: each rank reads through one Ray Data dataset (streaming: with one encoder
actor, which loads the encoders once) per SEGMENT micro-steps, across epochs. (One per epoch stalled the device at
every epoch's end, and a streamed run reloaded its encoders each epoch: every few steps on a small dataset.)"""


def planned_batches(samples: list[dict[str, Any]], batch_size: int, world_size: int, seed: int, rank: int,
                    start: int, stop: int) -> list[list[dict[str, Any]]]:
    """`rank`'s batches for micro-steps `start`..`stop - 1`, epoch after epoch: epoch e is micro-steps e*n..(e+1)*n - 1,
    n the length of a rank's epoch (the same every epoch: an edit's references share its bucket). A resumed run
    asks from its checkpoint's micro-step on and gets exactly the batches it had not trained."""
    per_epoch = len(plan_epoch(samples, batch_size, world_size, seed, 0)[rank])
    batches = []
    for epoch in range(start // per_epoch, -(-stop // per_epoch)):
        first = epoch * per_epoch  # the epoch's first micro-step
        batches += plan_epoch(samples, batch_size, world_size, seed, epoch)[rank][max(start - first, 0) : stop - first]
    return batches


def load_batch(row: dict[str, Any], options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A planned batch (sample ids + entry URLs) -> stacked arrays per kind."""
    members = json.loads(row["members"])
    out: dict[str, Any] = {"index": row["index"], "sample_ids": json.dumps([m["sample_id"] for m in members])}
    for kind in ENTRY_KINDS:
        if kind not in members[0]["entries"]:
            continue
        tensors = []
        for member in members:
            entry = require_entry(member["entries"][kind], options[kind_options_key(kind, member)], member["sample_id"])
            tensors.append(entry_tensor(kind, entry))
        out[f"{kind}_bytes"], out[f"{kind}_shape"], out[f"{kind}_dtype"] = tensor_to_bytes(torch.stack(tensors))
    return out


def kind_options_key(kind: str, member: dict[str, Any]) -> str:
    if kind in ("text", "blank"):
        return "text"
    return member["dataset_id"] if kind == "edit" else member["ref_dataset_id"]


# CPUs each training worker's data reader needs free beside the workers (training.check_cluster_fits): its Ray Data
# read tasks ask for one each, outside the workers' placement group (a Ray Train worker holds its whole bundle).
READER_CPUS = 1


def shard_dataset(batches: list[list[dict[str, Any]]], options: dict[str, dict[str, Any]]):
    """A rank's planned batches as a Ray Data dataset of stacked batches, in order."""
    import ray

    rows = [{"index": i, "members": json.dumps(b)} for i, b in enumerate(batches)]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return ray.data.from_items(rows).map(load_batch, fn_kwargs={"options": options}, num_cpus=READER_CPUS)


def batch_tensors(row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A row of `shard_dataset` -> torch tensors per kind (edit/ref latents, text/blank embeddings)."""
    return {
        kind: tensor_from_bytes(row[f"{kind}_bytes"], row[f"{kind}_shape"], row[f"{kind}_dtype"])
        for kind in ENTRY_KINDS
        if f"{kind}_bytes" in row
    }


def stream_dataset(batches: list[list[dict[str, Any]]], plan: CachePlan, encoder_gpus: float):
    """Streaming mode: a rank's planned batches, encoded as they are needed and never written. CPU tasks decode and
    fit the images; the rank's own encoder actor (the cache stage's) encodes them."""
    import ray

    from longcat_ray.cache import encoded_rows

    rows = [{**{k: m[k] for k in STREAM_KEYS}, "batch_index": i} for i, b in enumerate(batches) for m in b]
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return encoded_rows(rows, plan, actors=1, gpus_per_actor=encoder_gpus)


def group_encoded(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """The encoder's rows, in plan order -> (sample ids, stacked tensors per kind), one per planned batch."""
    from safetensors.torch import load as load_safetensors

    for _, members in itertools.groupby(rows, key=lambda row: row["batch_index"]):
        members = list(members)
        tensors = {
            kind: torch.stack([entry_tensor(kind, load_safetensors(m[f"{kind}_tensors"])) for m in members])
            for kind in ENTRY_KINDS
            if members[0][f"{kind}_tensors"]
        }
        yield [m["sample_id"] for m in members], tensors


class ReaderStalled(RuntimeError):
    """The consumer waited `stall_timeout_s` for the next batch."""


def prefetch(items: Iterable[Any], depth: int = 2, stall_timeout_s: float | None = None,
             explain: Callable[[], str] = lambda: "") -> Iterator[Any]:
    """`items`, produced `depth` ahead on a background thread (reading, decoding and pinning the next batches
    while the GPU trains on this one). Exceptions surface in the consumer; leaving early stops the producer. A wait
    for the next item longer than `stall_timeout_s` raises ReaderStalled with `explain()`."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def offer(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((pin_batch(item), None)):
                    return
            offer((done, None))
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer
            offer((done, err))

    thread = threading.Thread(target=produce, name="longcat-ray-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item, err = slots.get(timeout=stall_timeout_s)
            except queue.Empty:
                raise ReaderStalled(f"no batch for {stall_timeout_s:g} s (stall_timeout_s). {explain()}") from None
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()


def pin_batch(item: tuple[list[str], dict[str, torch.Tensor]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(sample ids, tensors) -> the same with the tensors in pinned host memory when a GPU will read them."""
    ids, tensors = item
    return (ids, {kind: t.pin_memory() for kind, t in tensors.items()}) if torch.cuda.is_available() else item


def stall_report() -> str:
    """What a starved reader waits on, from Ray's state API: tasks and actors pending for resources, against what
    the cluster has free."""
    import ray
    from ray.util.state import list_actors, list_tasks

    here = ray.get_runtime_context().gcs_address  # this cluster, not whichever the state API would discover
    try:
        tasks = list_tasks(address=here, filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], detail=True, limit=1000,
                           raise_on_missing_output=False)
        actors = list_actors(address=here, filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=1000,
                             raise_on_missing_output=False)
    except Exception as err:  # noqa: BLE001 -- a report without the state API still names the stall
        return f"(Ray's state API did not answer: {err})"
    waiting = [f"task {t.name} needs {t.required_resources}" for t in tasks]
    waiting += [f"actor {a.class_name} needs {a.required_resources}" for a in actors]
    free = {k: round(v, 2) for k, v in ray.available_resources().items()
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    if not waiting:
        return ("Nothing waits for cluster resources: the reader's tasks run but return nothing (slow or unreachable "
                f"storage?). Free now: {free}.")
    shown = "; ".join(sorted(set(waiting))[:8])
    return (f"{len(waiting)} waiting for resources no node has free: {shown}. Free now: {free}. Fix: fewer workers, "
            "nodes with more CPUs (or the resources named), or an autoscaler that can add them.")

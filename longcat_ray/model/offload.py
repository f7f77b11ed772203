"""The forward's saved activations kept in host memory until the backward needs them (`offload_activations: cpu`).

With the compiler's recomputation at budget 0 (gradient checkpointing's default under compile) each compiled block
keeps only its inputs for the backward: at 768², 30 blocks x ~32 MiB of hidden states, ~0.9 GiB (computed) of a
step that peaks at 8.2 GiB on an H200. Here they go to pinned host memory as they are saved, copied on a side stream
while the next block computes, and come back when the block's backward unpacks them: the same values, so the same
maths. Measured there: the peak fell by 0.23 GiB, not 0.9 (the peak is inside a double block's backward, when most
inputs are gone anyway), for 21 ms a step of copies back (benchmarks/RESULTS.md).

What is never moved: the model's own parameters and buffers (the frozen base, the LoRA: they stay on the device
anyway, and a copy would free nothing), and tensors smaller than `TOKENS` tokens of the model's width (per-sample
vectors: the timestep embedding, the modulation; small and many). A tensor saved twice while
it lives (one input read by q, k and v's LoRAs in an eager forward) is copied once.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

TOKENS = 64


@dataclass(eq=False)
class Offloaded:
    """A saved tensor's host copy; `ready` is recorded on the copy stream once the copy is queued (None on a CPU)."""

    host: torch.Tensor
    device: torch.device
    stride: tuple[int, ...]
    ready: torch.cuda.Event | None


@dataclass(eq=False)
class ActivationOffload:
    """Saved-tensor hooks for the training forward: `with offload.saving():` around it."""

    model: torch.nn.Module
    min_numel: int | None = None
    """Smallest tensor moved, in elements; None: TOKENS x the model's width (`inner_dim`)."""
    moved_bytes: int = 0
    """Bytes copied to the host so far (the training log shows them per step)."""
    keep: set[int] = field(init=False)
    stream: Any = field(init=False)
    live: dict[tuple, tuple[weakref.ref, Offloaded]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        # storages, not tensors: DeepSpeed may flatten the LoRA into one buffer, and a view of a weight is a weight
        self.keep = {t.untyped_storage().data_ptr() for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        if self.min_numel is None:
            self.min_numel = TOKENS * self.model.inner_dim

    @contextmanager
    def saving(self) -> Iterator[None]:
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self.live.clear()  # host copies stay alive through the autograd graph alone

    def movable(self, tensor: torch.Tensor) -> bool:
        return (type(tensor) is torch.Tensor and tensor.is_contiguous() and tensor.numel() >= self.min_numel
                and tensor.untyped_storage().data_ptr() not in self.keep)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | Offloaded:
        if not self.movable(tensor):
            return tensor
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype, tensor._version)
        seen = self.live.get(key)
        if seen is not None and seen[0]() is not None:  # the same memory, still alive, unchanged
            return seen[1]
        packed = self.copy_to_host(tensor)
        self.live[key] = (weakref.ref(tensor), packed)
        self.moved_bytes += tensor.nbytes
        return packed

    def copy_to_host(self, tensor: torch.Tensor) -> Offloaded:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        if not tensor.is_cuda:
            return Offloaded(host.copy_(tensor), tensor.device, tensor.stride(), None)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return Offloaded(host, tensor.device, tensor.stride(), ready)

    @staticmethod
    def unpack(packed: torch.Tensor | Offloaded) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.ready is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.ready)
        back = torch.empty_strided(packed.host.shape, packed.stride, dtype=packed.host.dtype, device=packed.device)
        return back.copy_(packed.host, non_blocking=True)

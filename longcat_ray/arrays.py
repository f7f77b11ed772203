"""Tensors through Ray Data as raw bytes + shape + dtype name: uniform Arrow columns, bfloat16 included."""

from __future__ import annotations

import json

import torch


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[bytes, str, str]:
    """-> (raw bytes, shape as JSON, dtype name)."""
    tensor = tensor.detach().cpu().contiguous()
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return data, json.dumps(list(tensor.shape)), str(tensor.dtype).removeprefix("torch.")


def tensor_from_bytes(data: bytes, shape: str, dtype: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(json.loads(shape))

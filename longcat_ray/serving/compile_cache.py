"""Compiled kernels kept between replicas: after a replica's warm-up has compiled, torch's cache artifacts (the
inductor and AOT-autograd caches of what it compiled) are written to `compile_cache_dir` (local or s3://); a later
replica with the same model, torch, device and levers loads them before it compiles, so its compile is a cache hit.
"""

from __future__ import annotations

import hashlib
import json

import torch

from longcat_ray.serving.config import ServeConfig
from longcat_ray.storage import filesystem, join, write_bytes_atomic


def cache_url(config: ServeConfig, device: str) -> str | None:
    """Where this replica's artifacts live: keyed by everything that changes what compiles."""
    if not config.compile_cache_dir:
        return None
    key = {"model": config.model, "torch": torch.__version__, "device": device, "quantize": config.quantize,
           "compile": config.compile, "warmup": config.warmup_shapes(), "max_batch_size": config.max_batch_size}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return join(config.compile_cache_dir, f"compile-{digest}.bin")


def load_compiled(url: str | None, options: dict) -> bool:
    """Loads the artifacts at `url` into this process's compile caches; False when there are none yet."""
    if url is None:
        return False
    fs, path = filesystem(url, options)
    if not fs.isfile(path):
        return False
    with fs.open(path, "rb") as handle:
        return torch.compiler.load_cache_artifacts(handle.read()) is not None


def save_compiled(url: str | None, options: dict) -> bool:
    """Writes what this process compiled so far to `url` (atomically); False when nothing compiled."""
    artifacts = torch.compiler.save_cache_artifacts() if url else None
    if not artifacts:
        return False
    fs, path = filesystem(url, options)
    write_bytes_atomic(fs, path, artifacts[0])
    return True

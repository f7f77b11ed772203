"""Compiled kernels shared between replicas (serving/compile_cache.py), with torch's real inductor on the CPU."""

import os

import torch

from longcat_ray.serving.compile_cache import cache_url, load_compiled, save_compiled
from longcat_ray.serving.config import ServeConfig


def block(x: torch.Tensor) -> torch.Tensor:
    return (x.sin() * 2 + x.cos()).sum(-1)


def test_kernels_one_replica_compiled_are_a_cache_hit_for_the_next(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    config = ServeConfig(model="m", compile=True, compile_cache_dir=str(tmp_path / "shared"), warmup_sizes=[])
    url = cache_url(config, "cpu")
    assert cache_url(config, "NVIDIA H200") != url  # another device, torch, model or lever: another file
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "first-replica"))
    assert not load_compiled(url, {})  # the first replica finds nothing and compiles
    torch._dynamo.reset()
    torch.compile(block)(torch.randn(8, 32))
    assert save_compiled(url, {}) and os.path.getsize(url) > 0
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "second-replica"))  # its own empty local caches
    torch._dynamo.reset()
    counters.clear()
    assert load_compiled(url, {})
    x = torch.randn(8, 32)
    torch.testing.assert_close(torch.compile(block)(x), block(x))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0, dict(counters["inductor"])

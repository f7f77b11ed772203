"""Host time DeepSpeed adds to a step per ZeRO setting, with 360 small trainable tensors (a LoRA's count at rank 32
on the full DiT) so that the model's own compute is negligible: what predicted the ZeRO-1 default and the
optimizer's clipping (issue 14).

    .venv/bin/python -m benchmarks.deepspeed_host_probe     # CPU, one gloo rank; prints ms per step

The engine comes from the product's own `zero.init_engine` (bf16, overflow check off, max_grad_norm 1); rows vary
the ZeRO stage, `contiguous_gradients`, and who clips (DeepSpeed's per-tensor norm, the path before ClippingAdamW,
or the optimizer). "over" = engine step (forward, backward, step) minus the same forward+backward on an identical
model without DeepSpeed. Each time is the best of 9 blocks of 10 steps.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import longcat_ray.zero as zero
from longcat_ray.config import TrainConfig

TENSORS = 360
# label -> (zero_stage, contiguous_gradients, the optimizer clips)
SETTINGS = {
    "ZeRO-2, contiguous gradients, DeepSpeed clips (first)": (2, True, False),
    "ZeRO-2, DeepSpeed clips": (2, False, False),
    "ZeRO-1, DeepSpeed clips": (1, False, False),
    "ZeRO-2, the optimizer clips": (2, False, True),
    "ZeRO-1, the optimizer clips (default)": (1, False, True),
}


class ManySmall(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.factors = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(8, 16) * 0.01) for _ in range(TENSORS)])

    def forward(self, x):  # x [4, 16]
        return sum((x @ p.t()).sum() for p in self.factors)


def best_ms(step, blocks: int = 9, reps: int = 10) -> float:
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(reps):
            step()
        times.append((time.perf_counter() - start) / reps)
    return min(times) * 1e3


def forward_backward_ms(x) -> float:
    torch.manual_seed(0)
    model = ManySmall().to(torch.bfloat16)

    def step():
        model(x).backward()
        model.zero_grad(set_to_none=True)

    step()
    return best_ms(step)


def with_contiguous(config: dict, contiguous: bool) -> dict:
    return {**config, "zero_optimization": {**config["zero_optimization"], "contiguous_gradients": contiguous}}


def engine_ms(stage: int, contiguous: bool, optimizer_clips: bool, x) -> float:
    torch.manual_seed(0)
    model = ManySmall()
    train = TrainConfig(mixed_precision="bf16", max_grad_norm=1.0, zero_stage=stage, max_train_steps=10**6)
    config, clips = zero.deepspeed_config, zero.optimizer_clips
    zero.optimizer_clips = lambda train: optimizer_clips  # noqa: E731 -- the row's clipping, for this engine only
    zero.deepspeed_config = lambda *a: with_contiguous(config(*a), contiguous)
    try:
        engine, _ = zero.init_engine(model, list(model.parameters()), train, 1)
    finally:
        zero.deepspeed_config, zero.optimizer_clips = config, clips

    def step():
        engine.backward(engine(x))
        engine.step()

    step()
    return best_ms(step)


def main() -> None:
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    alone = forward_backward_ms(x)  # the same model and input for every row
    for label, setting in SETTINGS.items():
        step = engine_ms(*setting, x)
        print(f"{label:55s} step {step:6.1f} ms   forward+backward alone {alone:5.1f} ms   over {step - alone:5.1f} ms", flush=True)


if __name__ == "__main__":
    main()

"""Host time DeepSpeed adds to a step per ZeRO setting, with 360 small trainable tensors (a LoRA's count at rank 32
on the full DiT) so that the model's own compute is negligible: what predicted the ZeRO-1 default (issue 14).

    .venv/bin/python -m benchmarks.deepspeed_host_probe     # CPU, one gloo rank; prints ms per step

The engine is built from the product's own `zero.deepspeed_config` (bf16, overflow check off); only the
`zero_optimization` block varies. "over" = engine step (forward, backward, step) minus the same forward+backward
on an identical model without DeepSpeed; each time is the best of 9 blocks of 10 steps.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from longcat_ray.config import TrainConfig
from longcat_ray.zero import deepspeed_config

TENSORS = 360
SETTINGS = {
    "ZeRO-2, contiguous gradients (before)": {"stage": 2, "contiguous_gradients": True},
    "ZeRO-2": {"stage": 2, "contiguous_gradients": False},
    "ZeRO-1, contiguous gradients": {"stage": 1, "contiguous_gradients": True},
    "ZeRO-1 (default)": {"stage": 1, "contiguous_gradients": False},
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


def engine_ms(zero: dict, x) -> float:
    import deepspeed

    torch.manual_seed(0)
    model = ManySmall()
    config = deepspeed_config(TrainConfig(mixed_precision="bf16", max_grad_norm=1.0), 1)
    config["zero_optimization"] = {**config["zero_optimization"], **zero}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config,
                                      dist_init_required=False)

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
    for label, zero in SETTINGS.items():
        step = engine_ms(zero, x)
        print(f"{label:40s} step {step:6.1f} ms   forward+backward alone {alone:5.1f} ms   DeepSpeed over {step - alone:5.1f} ms", flush=True)


if __name__ == "__main__":
    main()

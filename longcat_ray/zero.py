"""The one module that talks to DeepSpeed: config, engine, checkpoints, gathering ZeRO-3 weights.

Ray Train owns the process group; DeepSpeed joins it (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from longcat_ray.config import TrainConfig

CHECKPOINT_TAG = "zero"


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """Our TrainConfig -> a DeepSpeed config dict."""
    return {
        "train_micro_batch_size_per_gpu": train.train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.train_batch_size * train.gradient_accumulation_steps * world_size,
        # ZeRO-1/2: the optimizer clips (ClippingAdamW); DeepSpeed computes no norm of its own
        "gradient_clipping": 0.0 if optimizer_clips(train) else train.max_grad_norm,
        # DeepSpeed's bf16 overflow check tests each of the ~360 LoRA tensors for inf/nan every step (several small
        # kernels per tensor, then a host sync; `aten::isfinite` alone took 40 ms of host time per step under the
        # profiler on an H200, benchmarks/RESULTS.md). The training loop
        # checks the losses instead and stops on a non-finite one before it can be checkpointed (training.py).
        "bf16": {"enabled": train.mixed_precision == "bf16", "check_grad_overflow": False},
        # No gradient hooks at stage 1: contiguous_gradients (a copy of each gradient into one buffer as the backward
        # makes it, against fragmentation) pays for itself only with full-model gradients, not a LoRA's.
        "zero_optimization": {"stage": train.zero_stage, "overlap_comm": False, "contiguous_gradients": False,
                              **({"compute_grad_norm": False} if optimizer_clips(train) else {}), **offload(train)},
        "zero_allow_untested_optimizer": True,
        # offload steps our torch AdamW on the host partition (DeepSpeed's CPUAdam would be a C++ JIT build per machine)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default, for its own speed log, which steps_per_print silences) waits for
        # the whole device at each forward's start and each step's end: the GPU drains twice a step, then idles while
        # the host launches the next forward's first kernels (the 17.7 ms gap at a step boundary of an H200 profile)
        "timers": {"throughput": {"enabled": False}},
    }


def offload(train: TrainConfig) -> dict[str, Any]:
    """ZeRO's `offload_optimizer` entry for `train.offload_optimizer` (none: {})."""
    if train.offload_optimizer == "none":
        return {}
    # offload turns DeepSpeed's contiguous gradients on: a device buffer of reduce_bucket_size fp32 elements (5e8 by
    # default, 2 GB) staging the gradients on their way to the host; 2e7 (80 MB) still takes a LoRA in 3 copies
    return {"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}, "reduce_bucket_size": 20_000_000}


def optimizer_clips(train: TrainConfig) -> bool:
    """Whether ClippingAdamW clips the gradients instead of DeepSpeed. DeepSpeed's ZeRO-1/2 norm is one float64
    reduction per LoRA tensor (~720 kernels for the ~360 tensors) followed by host syncs that leave the GPU idle while
    the host finishes the step: 8.4 ms of reductions and 19.6 ms of idle GPU per step on an H200 (benchmarks/RESULTS.md).
    ZeRO-3 and optimizer offload cannot turn its norm off (DeepSpeed refuses `compute_grad_norm: false` there), so
    they keep DeepSpeed's."""
    return train.zero_stage in (1, 2) and train.offload_optimizer == "none" and train.max_grad_norm > 0


class ClippingAdamW(torch.optim.AdamW):
    """torch AdamW whose step first scales the gradients to a global L2 norm of at most `max_norm` (the maths of
    `torch.nn.utils.clip_grad_norm_` and of DeepSpeed's `gradient_clipping`), the squared norm summed over the
    data-parallel ranks. Under ZeRO-1/2 DeepSpeed hands it each rank's flat fp32 partition of the gradients (padding
    is zeros), so the norm is a couple of kernels and one all-reduce, with no host sync. One parameter group: DeepSpeed
    steps the groups one at a time, which would split the norm."""

    def __init__(self, params, *, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        if len(self.param_groups) != 1:
            raise ValueError(f"ClippingAdamW takes one parameter group, got {len(self.param_groups)}")
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        if params:
            clip_grads(params, self.max_norm)
        return super().step(closure)


def clip_grads(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scales `params`' gradients in place to a global norm of at most `max_norm` across every rank's share."""
    import torch.distributed as dist
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    square = get_total_norm([p.grad for p in params]).float().square()  # []
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(square)
    clip_grads_with_norm_(params, max_norm, square.sqrt())


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig):
    """SimpleTuner's scheduler names through diffusers' get_scheduler (warmup, decay to max_train_steps)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps, num_training_steps=train.max_train_steps
    )


def init_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], train: TrainConfig, world_size: int):
    """-> DeepSpeed engine over `model`, training `params` with torch AdamW (DeepSpeed's FusedAdam JIT
    build fails on the H100 hosts: DESIGN.md §4)."""
    import deepspeed

    fused = torch.cuda.is_available()
    if not fused:
        without_cpu_shm_op()
    clipping = {"max_norm": train.max_grad_norm} if optimizer_clips(train) else {}
    optimizer = (ClippingAdamW if clipping else torch.optim.AdamW)(
        params,
        **clipping,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
        fused=fused,
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_schedule(optimizer, train),
        config=deepspeed_config(train, world_size),
        dist_init_required=False,
    )
    return engine, scheduler


def without_cpu_shm_op() -> None:
    """Keeps DeepSpeed from building its CPU shared-memory all-reduce when it sets up communication on a CPU worker:
    a C++ JIT compile (~100 s of both cores on a 2-core machine, and again whenever another process had built it with
    other flags) used only by DeepSpeed's inference all-reduce, never in training (torch.distributed's all-reduce
    runs ours). DeepSpeed asks `deepspeed.ops.__compatible_ops__` whether to build it, a dict it keeps for edits."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


@contextlib.contextmanager
def frozen_weights_replaceable(engine):
    """Inside the block, frozen weights swapped out of the module (a quantized base) are freed as they go.

    `deepspeed.initialize` keeps a {parameter: name} map of every parameter, shared with its ZeRO optimizer;
    left alone it holds the replaced bf16 base alive beside its quantized copy (on an H200 the fp8-matmul row,
    then quantized here, peaked 4.2 GiB above bf16's: the fp8 copies' computed size). The map is edited in place (the optimizer holds the same dict): frozen entries
    leave before the block, the module's current parameters are named again after it."""
    names = engine.param_names
    for param in [p for p in names if not p.requires_grad]:
        del names[param]
    yield
    for name, param in engine.module.named_parameters():
        names.setdefault(param, name)


def save_checkpoint(engine, directory: str, client_state: dict[str, Any]) -> None:
    """Collective: every rank writes its shard (trainable parameters and optimizer state only)."""
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=client_state, exclude_frozen_parameters=True)


def load_checkpoint(engine, directory: str) -> dict[str, Any]:
    """Collective: restores parameters, optimizer and lr schedule; returns the client state."""
    _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=False)
    if client_state is None:
        raise RuntimeError(f"no DeepSpeed checkpoint under {directory}/{CHECKPOINT_TAG}")
    return client_state


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full values of `params` inside the block on every rank (ZeRO-3 partitions them; 1/2 do not)."""
    if zero_stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield

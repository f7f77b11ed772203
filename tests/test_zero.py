"""zero.py against a real DeepSpeed engine in this process (a one-rank gloo group; Ray Train is not needed)."""

import gc
import weakref

import pytest
import torch

from longcat_ray.config import LoraConfig, ModelConfig, TrainConfig
from longcat_ray.model.transformer import add_lora, load_transformer, quantize_base
from longcat_ray.zero import frozen_weights_replaceable, init_engine


@pytest.fixture(scope="module")
def one_rank_group():
    """One group for the module: DeepSpeed keeps the first group it sees (a second one would be unknown to it)."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0"}.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def test_a_quantized_base_frees_the_weights_it_replaces(tiny, one_rank_group):
    """DeepSpeed's {param: name} map would keep every replaced weight alive beside its quantized copy (torchao's
    weight-only base is swapped in after DeepSpeed placed the model; fp8-matmul converts before, in place_base)."""
    transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.float32, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    engine, _ = init_engine(transformer, params, TrainConfig(mixed_precision="no", max_train_steps=4), 1)
    import deepspeed.comm

    assert deepspeed.comm.comm.cdb.shm_comm_op is None  # the CPU shm all-reduce (a JIT C++ build) was not built
    base = weakref.ref(transformer.transformer_blocks[0].attn.to_q.base_layer.weight)
    with frozen_weights_replaceable(engine):
        quantize_base(transformer, "int8-torchao")
    gc.collect()
    assert base() is None
    assert set(engine.param_names) == set(transformer.parameters())  # every live parameter is named again
    assert all(engine.param_names[p] for p in params)


def train_steps(model: str, stage: int, steps: int = 3, max_grad_norm: float = 1.0, rank: int = 0, world: int = 1,
                offload: str = "none") -> tuple[list[float], dict[str, torch.Tensor]]:
    """`steps` DeepSpeed steps of the tiny DiT's LoRA at `stage` (float32) -> (losses, LoRA weights); each rank
    trains on its own sample."""
    from longcat_ray.model.loss import flow_matching_loss

    transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=model), torch.float32, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    train = TrainConfig(mixed_precision="no", max_train_steps=steps, zero_stage=stage, learning_rate=1e-2,
                        max_grad_norm=max_grad_norm, offload_optimizer=offload)
    engine, _ = init_engine(transformer, params, train, world)
    assert engine.optimizer.cpu_offload == (offload == "cpu")
    inputs = torch.Generator().manual_seed(1 + rank)
    edit, ref = torch.randn(2, 1, 16, 8, 8, generator=inputs)
    text = torch.randn(1, 6, transformer.config.joint_attention_dim, generator=inputs)
    losses = []
    for step in range(steps):
        loss = flow_matching_loss(engine, edit, ref, text, torch.Generator().manual_seed(step * world + rank))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    lora = {name: p.detach().clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return losses, lora


def test_zero1_and_zero2_train_the_same_lora(tiny, one_rank_group):
    """ZeRO-1 (the default, no per-tensor gradient hooks) is the same optimizer as ZeRO-2: equal losses and weights."""
    losses_1, lora_1 = train_steps(str(tiny.model), 1)
    losses_2, lora_2 = train_steps(str(tiny.model), 2)
    assert losses_1 == losses_2
    assert losses_1[0] != losses_1[-1]  # the LoRA moved
    for name, weight in lora_2.items():
        torch.testing.assert_close(lora_1[name], weight, atol=0, rtol=0)


def test_the_optimizer_offloaded_to_the_host_trains_the_same_lora(tiny, one_rank_group):
    """offload_optimizer: cpu keeps the master weights and moments in host memory and DeepSpeed clips: the same
    losses and LoRA as the optimizer on the device (the default) within float32 rounding of the clipping norm."""
    losses, lora = train_steps(str(tiny.model), 1, max_grad_norm=0.05)
    losses_offloaded, lora_offloaded = train_steps(str(tiny.model), 1, max_grad_norm=0.05, offload="cpu")
    assert losses_offloaded == pytest.approx(losses, rel=1e-6)
    for name, weight in lora_offloaded.items():
        torch.testing.assert_close(weight, lora[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_step_never_waits_for_the_device(tiny, one_rank_group, monkeypatch, stage):
    """No device-wide synchronize in the forward, backward or step (DeepSpeed's throughput timer made two a step from
    the third step on: the GPU drained, then waited for the host to launch the next forward)."""
    from deepspeed.accelerator import get_accelerator

    waits = []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *args: waits.append(args))
    train_steps(str(tiny.model), stage, steps=4)
    assert waits == []


def deepspeed_clipping(patch) -> None:
    """The path before ClippingAdamW: plain AdamW, DeepSpeed's own `gradient_clipping` and per-tensor norm."""
    import longcat_ray.zero as zero

    patch.setattr(zero, "optimizer_clips", lambda train: False)


def test_the_optimizer_clips_as_deepspeed_did(tiny, one_rank_group, monkeypatch):
    """ClippingAdamW (ZeRO-1/2's default) against DeepSpeed's own clipping, same seed, with a max_grad_norm small enough
    that every step is clipped: the same LoRA; and clipping is really on (unclipped training ends elsewhere)."""
    ours = train_steps(str(tiny.model), 1, max_grad_norm=1e-3)
    unclipped = train_steps(str(tiny.model), 1, max_grad_norm=0.0)
    deepspeed_clipping(monkeypatch)
    theirs = train_steps(str(tiny.model), 1, max_grad_norm=1e-3)
    torch.testing.assert_close(ours, theirs)
    assert any((unclipped[1][name] - weight).abs().max() > 1e-4 for name, weight in ours[1].items())


def two_rank_run(rank: int, model: str, port: int, stage: int, deepspeed_clips: bool, out: str) -> None:
    """One of two gloo ranks: train, then save what rank 0 holds."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    with pytest.MonkeyPatch.context() as patch:
        if deepspeed_clips:
            deepspeed_clipping(patch)
        losses, lora = train_steps(model, stage, max_grad_norm=1e-3, rank=rank, world=2)
    if rank == 0:
        torch.save({"losses": losses, "lora": lora}, out)
    dist.destroy_process_group()


def test_the_clipping_norm_spans_both_ranks(tiny, tmp_path, stage=1):
    """Two gloo ranks, each optimizing its half of the flat gradients: the norm that clips them is the global one
    (DeepSpeed's own clipping gives the same LoRA). A rank-local norm would clip each half differently. (ZeRO-2 hands
    the optimizer the same partition: test_zero1_and_zero2_train_the_same_lora.)"""
    import torch.multiprocessing as mp

    results = {}
    for port, deepspeed_clips in ((29541 + 2 * stage, False), (29542 + 2 * stage, True)):
        out = str(tmp_path / f"{deepspeed_clips}.pt")
        mp.spawn(two_rank_run, args=(str(tiny.model), port, stage, deepspeed_clips, out), nprocs=2)
        results[deepspeed_clips] = torch.load(out)
    torch.testing.assert_close(results[False], results[True])

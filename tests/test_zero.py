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
    """DeepSpeed's {param: name} map would keep every replaced bf16 weight alive beside its fp8 copy."""
    transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.float32, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    engine, _ = init_engine(transformer, params, TrainConfig(mixed_precision="no", max_train_steps=4), 1)
    base = weakref.ref(transformer.transformer_blocks[0].attn.to_q.base_layer.weight)
    with frozen_weights_replaceable(engine):
        quantize_base(transformer, "fp8-matmul")
    gc.collect()
    assert base() is None
    assert set(engine.param_names) == set(transformer.parameters())  # every live parameter is named again
    assert all(engine.param_names[p] for p in params)


def train_steps(tiny, stage: int, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """`steps` DeepSpeed steps of the tiny DiT's LoRA at `stage` (float32) -> (losses, LoRA weights)."""
    from longcat_ray.model.loss import flow_matching_loss

    transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.float32, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    train = TrainConfig(mixed_precision="no", max_train_steps=steps, zero_stage=stage, learning_rate=1e-2)
    engine, _ = init_engine(transformer, params, train, 1)
    inputs = torch.Generator().manual_seed(1)
    edit, ref = torch.randn(2, 1, 16, 8, 8, generator=inputs)
    text = torch.randn(1, 6, transformer.config.joint_attention_dim, generator=inputs)
    losses = []
    for step in range(steps):
        loss = flow_matching_loss(engine, edit, ref, text, torch.Generator().manual_seed(step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    lora = {name: p.detach().clone() for name, p in transformer.named_parameters() if p.requires_grad}
    return losses, lora


def test_zero1_and_zero2_train_the_same_lora(tiny, one_rank_group):
    """ZeRO-1 (the default, no per-tensor gradient hooks) is the same optimizer as ZeRO-2: equal losses and weights."""
    losses_1, lora_1 = train_steps(tiny, 1)
    losses_2, lora_2 = train_steps(tiny, 2)
    assert losses_1 == losses_2
    assert losses_1[0] != losses_1[-1]  # the LoRA moved
    for name, weight in lora_2.items():
        torch.testing.assert_close(lora_1[name], weight, atol=0, rtol=0)

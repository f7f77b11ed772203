"""zero.py against a real DeepSpeed engine in this process (a one-rank gloo group; Ray Train is not needed)."""

import gc
import weakref

import pytest
import torch

from longcat_ray.config import LoraConfig, ModelConfig, TrainConfig
from longcat_ray.model.transformer import add_lora, load_transformer, quantize_base
from longcat_ray.zero import frozen_weights_replaceable, init_engine


@pytest.fixture
def one_rank_group(monkeypatch):
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
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

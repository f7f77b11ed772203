"""The trained model: frozen base (fp32/bf16, int8, fp8 via torchao) + LoRA on the official targets."""

import pytest
import torch

from longcat_ray.config import OFFICIAL_LORA_TARGETS, LoraConfig, ModelConfig
from longcat_ray.model.loss import flow_matching_loss
from longcat_ray.model.transformer import add_lora, load_transformer


def loss_and_grads(tiny, precision):
    model = ModelConfig(pretrained_model_name_or_path=str(tiny.model), base_model_precision=precision)
    transformer = load_transformer(model, torch.float32, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)  # B starts at zero: make the adapter contribute so A gets a gradient too
    g = torch.Generator().manual_seed(0)
    edit, ref, text = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 20, 64, generator=g)
    loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(1))
    loss.backward()
    return transformer, params, loss.item()


@pytest.mark.parametrize("precision,weight_type", [("int8-torchao", "Int8Tensor"), ("fp8-torchao", "Float8Tensor")])
def test_quantized_base_trains_the_lora(tiny, precision, weight_type):
    _, _, reference = loss_and_grads(tiny, "no_change")
    transformer, params, loss = loss_and_grads(tiny, precision)
    base = transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert type(base).__name__ == weight_type and not base.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert loss == pytest.approx(reference, rel=0.05)  # weight-only quantisation barely moves the loss


def test_lora_covers_the_official_targets_only(tiny):
    transformer, params, _ = loss_and_grads(tiny, "no_change")
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A" in n}
    assert wrapped and all(any(w.endswith(t) for t in OFFICIAL_LORA_TARGETS) for w in wrapped)
    assert sum(p.requires_grad for p in transformer.parameters()) == len(params)

"""model/offload.py: the forward's saved activations wait in host memory and come back unchanged."""

import pytest
import torch

from longcat_ray.config import LoraConfig, ModelConfig
from longcat_ray.model.loss import flow_matching_loss
from longcat_ray.model.offload import ActivationOffload
from longcat_ray.model.transformer import add_lora, load_transformer, place_base, speed_up_training


def lora_step(tiny, offload: bool, compile: bool, device: str = "cpu"):
    """One forward/backward of the tiny DiT's LoRA (compiled blocks recomputing everything but their inputs, as
    gradient checkpointing's default under compile) -> (loss, LoRA gradients, the offload or None, the storages of
    the model's weights)."""
    torch._dynamo.reset()
    model = ModelConfig(pretrained_model_name_or_path=str(tiny.model))
    transformer = load_transformer(model, torch.float32, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    place_base(transformer, "no_change", torch.device(device))
    speed_up_training(transformer, "sdpa", compile=compile, backend="aot_eager", memory_budget=0.0 if compile else None)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)  # B starts at zero: make the adapter contribute so A gets a gradient too
    hooks = ActivationOffload(transformer) if offload else None
    weights = {t.untyped_storage().data_ptr() for t in [*transformer.parameters(), *transformer.buffers()]}
    g = torch.Generator().manual_seed(0)
    edit, ref, text = (torch.randn(shape, generator=g).to(device) for shape in ((1, 16, 16, 16), (1, 16, 16, 16), (1, 20, 64)))
    moved = []
    if hooks:  # every tensor that goes to the host, seen on its way
        copy = hooks.copy_to_host
        hooks.copy_to_host = lambda t: moved.append(t.untyped_storage().data_ptr()) or copy(t)
    with hooks.saving() if hooks else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(1))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in params], hooks, set(moved) & weights


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_offloaded_activations_give_the_same_gradients(tiny, compile):
    loss, grads, _, _ = lora_step(tiny, offload=False, compile=compile)
    offloaded_loss, offloaded_grads, hooks, weights_moved = lora_step(tiny, offload=True, compile=compile)
    assert hooks.moved_bytes > 0 and weights_moved == set()
    assert offloaded_loss == loss
    for mine, theirs in zip(offloaded_grads, grads):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_offloaded_activations_on_the_gpu_come_back_from_pinned_memory(tiny):
    """On a GPU the copies run on a side stream into pinned memory and back: still the same loss and gradients."""
    loss, grads, _, _ = lora_step(tiny, offload=False, compile=True, device="cuda")
    offloaded_loss, offloaded_grads, hooks, weights_moved = lora_step(tiny, offload=True, compile=True, device="cuda")
    assert hooks.moved_bytes > 0 and weights_moved == set()
    assert offloaded_loss == loss
    for mine, theirs in zip(offloaded_grads, grads):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)

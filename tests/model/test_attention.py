"""Training attention: the processor's maths is diffusers', and cuDNN's backward matches FlashAttention-2's."""

import pytest
import torch

from longcat_ray.config import ModelConfig
from longcat_ray.model.attention import TrainingAttnProcessor, joint_attention, use_training_attention
from longcat_ray.model.loss import flow_matching_loss
from longcat_ray.model.transformer import load_transformer


def loss_and_input_grads(transformer):
    g = torch.Generator().manual_seed(0)
    edit = torch.randn(2, 16, 16, 16, generator=g)
    ref, text = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 20, 64, generator=g, requires_grad=True)
    loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(1))
    loss.backward()
    return loss.detach(), text.grad


def test_training_processor_matches_diffusers(tiny):
    model = ModelConfig(pretrained_model_name_or_path=str(tiny.model))
    transformer = load_transformer(model, torch.float32, torch.device("cpu"))
    reference = loss_and_input_grads(transformer)
    use_training_attention(transformer, "sdpa")
    assert all(isinstance(p, TrainingAttnProcessor) for p in transformer.attn_processors.values())
    loss, grad = loss_and_input_grads(transformer)
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, reference[1], rtol=1e-5, atol=1e-7)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="attention backend"):
        use_training_attention(torch.nn.Module(), "flash3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cudnn_backward_matches_flash_at_longcat_shapes():
    """5318 tokens (710 text + 2 x 2304 image), 24 heads x 128, bf16; the gradient of the output arrives
    transposed as in the DiT, which is what made cuDNN's backward read out of bounds without ContiguousGrad."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 5318, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
               for _ in range(3))
    weight = torch.randn(1, 5318, 24 * 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def grads(backend: str):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = joint_attention(q, k, v, backend).flatten(2, 3)
        (out.float() * weight).sum().backward()
        result = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        return result

    flash, cudnn = grads("sdpa"), grads("cudnn")
    for a, b in zip(cudnn, flash):
        assert (a.float() - b.float()).abs().max() < 0.05 * b.float().abs().max()

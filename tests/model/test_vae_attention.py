"""The VAE encoder's wide-head attention equals diffusers' SDPA processor."""

import copy

import torch
import torch.nn.functional as F

from longcat_ray.model.latents import encode_latents
from longcat_ray.model.vae_attention import WideHeadAttnProcessor, use_wide_head_attention, wide_head_attention


def test_wide_head_attention_equals_sdpa_for_uneven_query_splits():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 37, 24).unbind(0)  # 37 queries: pieces of 5 and 4
    expected = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=0.2)[:, 0]
    torch.testing.assert_close(wide_head_attention(q, k, v, 0.2), expected)


def test_vae_encoder_with_wide_head_attention_equals_the_stock_one(tiny_pipe):
    vae = copy.deepcopy(tiny_pipe.vae)
    assert use_wide_head_attention(vae) == 1
    assert isinstance(vae.encoder.mid_block.attentions[0].processor, WideHeadAttnProcessor)
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    torch.testing.assert_close(encode_latents(vae, pixels), encode_latents(tiny_pipe.vae, pixels))

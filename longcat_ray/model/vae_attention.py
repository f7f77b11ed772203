"""The Flux VAE encoder's mid-block attention without the slow kernel its head size sends SDPA to.

The attention is one head of 512 over every latent position (9,216 at 768²). No fused SDPA kernel on an H100
takes a head of 512 but the sm80 memory-efficient one: 1.46 ms per image for ~174 GFLOP, 17% of the compiled
encoder's time (profiled; benchmarks/RESULTS.md). `wide_head_attention` runs it as two matmuls and a softmax instead,
with the numerics of a fused kernel: scores accumulated and normalised in fp32, the probabilities rounded to
the inputs' dtype for the second product. The queries go in `QUERY_SPLITS` pieces, so the fp32 scores of a
batch of 32 at 768² take 1.4 GB at a time, not 11 (computed from the shapes).
"""

from __future__ import annotations

import torch

QUERY_SPLITS = 8


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [n, s, d], k [n, t, d] -> q k^T [n, s, t] in fp32 (bf16/fp16 inputs accumulate in fp32 on a GPU)."""
    if q.is_cuda and q.dtype != torch.float32:
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return q.float() @ k.float().transpose(1, 2)


def wide_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k, v [n, s, d] -> softmax(q k^T * scale) v [n, s, d], in QUERY_SPLITS pieces of the queries."""
    pieces = [
        torch.softmax(attention_scores(part, k) * scale, dim=-1).to(v.dtype) @ v
        for part in q.tensor_split(QUERY_SPLITS, dim=1)
    ]
    return torch.cat(pieces, dim=1)


class WideHeadAttnProcessor:
    """A diffusers attention processor for the VAE's single-head spatial self-attention (AttnProcessor2_0's
    maths, `wide_head_attention` for the product)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None or attn.heads != 1:
            raise ValueError("WideHeadAttnProcessor handles single-head spatial self-attention without a mask only")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w)  # [b, c, s]
        x = attn.group_norm(x).transpose(1, 2) if attn.group_norm is not None else x.transpose(1, 2)  # [b, s, c]
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        out = wide_head_attention(q, k, v, q.shape[-1] ** -0.5)  # AttnProcessor2_0's scale: SDPA's default
        out = attn.to_out[1](attn.to_out[0](out))  # [b, s, c]
        out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def use_wide_head_attention(vae) -> int:
    """Route the VAE encoder's single-head attention layers through WideHeadAttnProcessor -> layers changed."""
    changed = 0
    for attn in getattr(vae.encoder.mid_block, "attentions", []):
        if attn is not None and attn.heads == 1 and attn.norm_q is None and attn.norm_k is None:
            attn.set_processor(WideHeadAttnProcessor())
            changed += 1
    return changed

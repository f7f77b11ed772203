"""Joint attention for training: cuDNN's fused kernel, given the gradient layout its backward needs.

At LongCat's 5318 tokens (24 heads x 128, bf16) cuDNN's SDPA runs forward + backward in 2.24 ms against
FlashAttention-2's 4.16 ms on an H200 (DESIGN.md §4). Its backward reads an illegal address when the gradient of
its output is not contiguous, which is what diffusers' processor hands it (the output is transposed back to
[b, L, h, d] and flattened). `ContiguousGrad` sits right after the kernel and makes that gradient contiguous;
the maths is the processor's, line for line (a CPU test checks it against diffusers').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("cudnn", "sdpa")  # what `resolve_backend` turns the config's auto/cudnn/sdpa into


class ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous copy of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[b, h, L, d] x 3 -> [b, h, L, d] through cuDNN's kernel itself (no backend selection: an unsupported shape
    fails loudly instead of silently running another kernel)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[0]


def joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """[b, L, h, d] x 3 -> [b, L, h, d], unmasked, non-causal, scale 1/sqrt(d)."""
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))  # -> [b, h, L, d]
    out = cudnn_attention(q, k, v) if backend == "cudnn" else F.scaled_dot_product_attention(q, k, v)
    return ContiguousGrad.apply(out).transpose(1, 2)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> cudnn on a Hopper-or-newer GPU (where it was measured), else torch's SDPA selection."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "cudnn"
    return "sdpa"


class TrainingAttnProcessor:
    """diffusers' LongCatImageAttnProcessor with the attention call replaced by `joint_attention`."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None or getattr(attn, "fused_projections", False):
            raise ValueError("TrainingAttnProcessor takes no attention mask (LongCat's training sequence has none) "
                             "and no fused q/k/v projections (LoRA targets the separate to_q/to_k/to_v)")
        heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731  [b, L, h*d] -> [b, L, h, d]
        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if attn.added_kv_proj_dim is not None:  # double block: text tokens first, then image tokens
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = joint_attention(query, key, value, self.backend).flatten(2, 3).to(query.dtype)  # [b, L, h*d]
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def use_training_attention(transformer, backend: str) -> None:
    """Every attention module of the DiT runs `TrainingAttnProcessor(backend)`."""
    if backend not in KERNELS:
        raise ValueError(f"attention backend must be one of {KERNELS} (resolve `auto` first), got {backend!r}")
    transformer.set_attn_processor(TrainingAttnProcessor(backend))

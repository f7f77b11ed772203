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

from longcat_ray.model.fp8 import SHARED_INPUT

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


def vanilla_adapter(layer: torch.nn.Module):
    """-> (lora_A, lora_B, scaling) when `layer` is a peft LoRA linear adding exactly one plain adapter without
    dropout (what `shared_input_projections` can batch), else None."""
    if not hasattr(layer, "lora_A") or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant or not isinstance(layer.lora_dropout[active[0]], torch.nn.Identity):
        return None
    return layer.lora_A[active[0]], layer.lora_B[active[0]], layer.scaling[active[0]]


def shared_input_projections(attn, x: torch.Tensor, group_name: str, fuse: bool) -> list[torch.Tensor]:
    """[b, L, in] through `attn`'s projections of `group_name` (model/fp8.py SHARED_INPUT) -> [b, L, out] each. With
    `fuse` and the frozen group built (`Float8Group`) under plain LoRAs: the bases as one matmul and the LoRAs'
    down-projections as one ([b, L, sum r]); each up-projection alone (their inputs differ). Else each layer is
    called as it is."""
    layers = [getattr(attn, name) for name in SHARED_INPUT[group_name]]
    group = getattr(attn, group_name, None) if fuse else None
    adapters = [vanilla_adapter(layer) for layer in layers] if group is not None else []
    if group is None or any(adapter is None for adapter in adapters):
        return [layer(x) for layer in layers]
    outs = group(x)  # the frozen bases: [b, L, out_i] each
    downs = [a.weight for a, _, _ in adapters]  # [r_i, in] each
    h = F.linear(x.to(downs[0].dtype), torch.cat(downs)).split([w.shape[0] for w in downs], dim=-1)  # [b, L, r_i]
    return [(out + F.linear(h_i, b.weight, b.bias) * scaling).to(out.dtype) for out, h_i, (_, b, scaling) in zip(outs, h, adapters)]


class TrainingAttnProcessor:
    """diffusers' LongCatImageAttnProcessor with the attention call replaced by `joint_attention`, and q/k/v
    projected at once where `fuse` and the base allow (`shared_input_projections`)."""

    def __init__(self, backend: str, fuse: bool = True):
        self.backend, self.fuse = backend, fuse

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None or getattr(attn, "fused_projections", False):
            raise ValueError("TrainingAttnProcessor takes no attention mask (LongCat's training sequence has none) "
                             "and no fused q/k/v projections (LoRA targets the separate to_q/to_k/to_v)")
        heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731  [b, L, h*d] -> [b, L, h, d]
        query, key, value = (heads(t) for t in shared_input_projections(attn, hidden_states, "float8_qkv", self.fuse))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # double block: text tokens first, then image tokens
            text_query, text_key, text_value = (
                heads(t) for t in shared_input_projections(attn, encoder_hidden_states, "float8_added_qkv", self.fuse))
            query = torch.cat([attn.norm_added_q(text_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_key), key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = joint_attention(query, key, value, self.backend).flatten(2, 3).to(query.dtype)  # [b, L, h*d]
        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def use_training_attention(transformer, backend: str, fuse: bool = True) -> None:
    """Every attention module of the DiT runs `TrainingAttnProcessor(backend, fuse)`."""
    if backend not in KERNELS:
        raise ValueError(f"attention backend must be one of {KERNELS} (resolve `auto` first), got {backend!r}")
    transformer.set_attn_processor(TrainingAttnProcessor(backend, fuse))

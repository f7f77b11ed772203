"""Qwen2.5-VL's vision tower, made faster without changing its maths.

- Attention: the tower attends within windows of 8x8 patches (28 of its 32 layers) and within each image (the
  other 4). Without flash-attention's varlen kernel, transformers runs one SDPA call per window: at 768² a
  batch of 16 references is 256 windows, ~7,000 small calls per forward. `packed_attention` pads the windows
  to one length and runs them as one batched SDPA call with a key mask.
- MLP width: 3420 is not a multiple of 64, which sends its matmuls to a slow kernel on an H100
  (benchmarks/RESULTS.md). `pad_mlp` appends zero rows/columns: the padded units output exactly 0.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k, v [s, heads, d], segments [n + 1] (cumulative lengths) -> [s, heads, d], attention within segments."""
    lengths = cu_seqlens.diff()
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=q.device)
    valid = offsets < lengths[:, None]  # [n, longest]
    index = torch.where(valid, cu_seqlens[:-1, None] + offsets, 0)  # [n, longest] token index (0 where padded)
    mask = None if bool(valid.all()) else valid[:, None, None, :]  # padded keys never attended to

    def windows(x: torch.Tensor) -> torch.Tensor:
        return x[index].transpose(1, 2)  # [s, h, d] -> [n, h, longest, d]

    out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid]  # [n, longest, h, d] -> [s, h, d], segments in order


def packed_vision_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs) -> torch.Tensor:
    """Qwen2_5_VLVisionAttention.forward with packed_attention in place of the per-window loop."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = kwargs["position_embeddings"]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = packed_attention(q, k, v, cu_seqlens, getattr(self, "scaling", self.head_dim**-0.5))
    return self.proj(out.reshape(seq, -1))


def pad_mlp(mlp: torch.nn.Module, multiple: int) -> bool:
    """Widen a gated MLP (gate_proj, up_proj, down_proj) to a multiple of `multiple` units with zero weights:
    a padded unit's up projection is 0, so its product and its share of down_proj are exactly 0."""
    width = mlp.up_proj.out_features
    padded = -(-width // multiple) * multiple
    if padded == width:
        return False
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = torch.nn.Linear(old.in_features, padded, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:width] = old.weight
            if old.bias is not None:
                new.bias.zero_()
                new.bias[:width] = old.bias
        setattr(mlp, name, new.requires_grad_(old.weight.requires_grad))
    old = mlp.down_proj
    new = torch.nn.Linear(padded, old.out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :width] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    mlp.down_proj = new.requires_grad_(old.weight.requires_grad)
    return True


def speed_up_vision(text_encoder, mlp_multiple: int = 64) -> None:
    """pack_vision_attention + pad_mlp on every block of a Qwen2.5-VL model's vision tower."""
    visual = getattr(getattr(text_encoder, "model", text_encoder), "visual", None)
    if visual is None:
        return
    for block in visual.blocks:
        if hasattr(block.mlp, "up_proj"):
            pad_mlp(block.mlp, mlp_multiple)
    pack_vision_attention(text_encoder)


def pack_vision_attention(text_encoder) -> int:
    """Route every vision attention layer of a Qwen2.5-VL model through packed_attention (unless it already
    uses a flash-attention varlen kernel) -> number of layers changed."""
    visual = getattr(getattr(text_encoder, "model", text_encoder), "visual", None)
    if visual is None or "flash" in str(visual.config._attn_implementation):
        return 0
    changed = 0
    for block in visual.blocks:
        if type(block.attn).__name__ == "Qwen2_5_VLVisionAttention":
            block.attn.forward = types.MethodType(packed_vision_attention_forward, block.attn)
            changed += 1
    return changed

"""The frozen base's linears as fp8 matmuls (`base_model_precision: fp8-matmul`).

Each frozen `nn.Linear` keeps its weight as float8 e4m3 with one per-tensor scale, quantised once at load
(the base never changes). Forward: the input is scaled per tensor to e4m3 and multiplied on the fp8 tensor
cores (`torch._scaled_mm`, bf16 out, bias fused). Backward computes the input's gradient only (the weight is
frozen): the incoming gradient is scaled to e5m2 and multiplied with the same fp8 weight. That is 4 matmul
FLOPs per weight and token, as the bf16 base does; torchao's float8 *training* conversion also computes the
weight's gradient (6), re-casts the weights every step, and needs the token count to be a multiple of 16
(the 710-token text is not). `_scaled_mm` needs only the weight's two dims to be multiples of 16.

LoRA stays in bf16 beside it (peft calls this module as its `base_layer`). The weight is a non-persistent
buffer: checkpoints hold no base weights, and DeepSpeed neither casts nor partitions it.

The linears whose input is one row per sample (the blocks' modulation `norm*.linear`, 1.72 B of the DiT's 6.27 B
weights, and the timestep embedding) gain nothing from fp8 tensor cores: they are memory-bound matrix-vector
products. They are stored as int8 with one scale per output row (`Int8RowwiseFrozenLinear`) and dequantised for
their matmul, so every frozen weight of the base takes one byte (bf16 modulation alone took 3.2 GiB).
"""

from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def scale_to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (x in `dtype` scaled so its absolute maximum maps to the format's maximum, the inverse
    scale as a float32 scalar tensor)."""
    top = torch.finfo(dtype).max
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def scaled_matmul(a: torch.Tensor, a_inv: torch.Tensor, b_t: torch.Tensor, b_inv: torch.Tensor, out_dtype, bias=None):
    """[m, k] fp8 row-major @ [k, n] fp8 column-major -> [m, n] in out_dtype (+ bias)."""
    return torch._scaled_mm(a, b_t, scale_a=a_inv, scale_b=b_inv, bias=bias, out_dtype=out_dtype)


class Float8Matmul(torch.autograd.Function):
    """y = x W^T + b with W frozen in e4m3; the backward returns dL/dx only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_inv: torch.Tensor, bias: torch.Tensor | None):
        rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [m, in]
        xq, x_inv = scale_to_float8(rows, E4M3)
        out = scaled_matmul(xq, x_inv, weight.t(), weight_inv, x.dtype, bias)  # [m, out]
        ctx.save_for_backward(weight, weight_inv)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, weight_inv = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # [..., out] -> [m, out]
        gq, g_inv = scale_to_float8(rows, E5M2)
        weight_t = weight.t().contiguous()  # [in, out] row-major; its .t() is W [out, in] column-major
        grad_x = scaled_matmul(gq, g_inv, weight_t.t(), weight_inv, grad.dtype)  # [m, in]
        return grad_x.reshape(*grad.shape[:-1], weight.shape[1]), None, None, None


class Float8FrozenLinear(torch.nn.Linear):
    """A frozen nn.Linear whose matmuls run in fp8 (a subclass, so peft wraps it as it wraps any Linear)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, inv = scale_to_float8(linear.weight.detach(), E4M3)
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_inv", inv, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.weight = None  # type: ignore[assignment]  -- no bf16 copy is kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Float8Matmul.apply(x, self.weight_fp8, self.weight_inv, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-tensor"


def fits_float8(linear: torch.nn.Linear, min_features: int) -> bool:
    """_scaled_mm needs both weight dims to be multiples of 16; small linears are not worth it."""
    rows, cols = linear.weight.shape
    return rows % 16 == 0 and cols % 16 == 0 and min(rows, cols) >= min_features


class Int8RowwiseFrozenLinear(torch.nn.Linear):
    """A frozen nn.Linear stored as int8 with a float32 scale per output row: y = (x Q^T) * s + b, the product in
    the input's dtype (int8 values are exact in bf16), the scaling and bias in float32. Round-to-nearest: each
    weight within half a step (s / 2 = its row's |max| / 254) of the original."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().to(torch.int8), persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float(), persistent=False)
        self.weight = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight_int8.to(x.dtype)).float() * self.weight_scale  # [..., out]
        return (out if self.bias is None else out + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output row"


ROW_INPUT = ("norm", "time_embed")  # modulation and timestep embedding: one input row per sample


def swap_frozen_linears(model: torch.nn.Module, replace) -> None:
    """In place: every frozen plain nn.Linear (never LoRA's) for which `replace(fqn, linear)` returns a module is
    swapped for it."""
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            fqn = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or "lora_" in fqn or child.weight.requires_grad:
                continue
            new = replace(fqn, child)
            if new is not None:
                setattr(parent, child_name, new)


def convert_base(model: torch.nn.Module, min_features: int) -> None:
    """`fp8-matmul`'s frozen base, in place: the one-row-input linears (`ROW_INPUT`) as int8 per row, every other
    linear that fits (both dims >= `min_features`, multiples of 16) as fp8 matmuls; the rest stay as they are."""

    def replace(fqn: str, linear: torch.nn.Linear) -> torch.nn.Module | None:
        if any(s in fqn for s in ROW_INPUT):
            return Int8RowwiseFrozenLinear(linear)
        return Float8FrozenLinear(linear) if fits_float8(linear, min_features) else None

    swap_frozen_linears(model, replace)

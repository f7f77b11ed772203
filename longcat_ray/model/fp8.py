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

Linears that read the same input — each attention's q, k and v — are quantised together, with one scale over the
three weights (`Float8Group`), so the training attention multiplies them as one [3 x out, in] weight: the step is
bound by the host launching ~4,600 kernels (benchmarks/RESULTS.md), and this is two `_scaled_mm` fewer per stream
and attention each way, and two gradient quantisations fewer in the backward. One scale instead of three keeps e4m3's relative precision (3
mantissa bits) for every weight; it changes only which small weights fall into the subnormal range (below 2^-6/448 of
the group's largest |weight| instead of the member's own).

The linears whose input is one row per sample (the blocks' modulation `norm*.linear`, 1.72 B of the DiT's 6.27 B
weights, and the timestep embedding) gain nothing from fp8 tensor cores: they are memory-bound matrix-vector
products. They are stored as int8 with one scale per output row (`Int8RowwiseFrozenLinear`) and dequantised for
their matmul, so every frozen weight of the base takes one byte (bf16 modulation alone took 3.2 GiB).

Serving (`quantize: fp8`) uses the same conversion with one change, `Float8RowwiseLinear`: scales per token row
and per output row instead of per tensor, forward only. Per-row input scales keep each request's output
independent of whatever else shares its batch (a per-tensor scale would let one request's outlier coarsen another's
rounding), and plain buffers compile fast: the first 768² edit on an H200, compile included, took 31 s against 282 s
with torchao's subclass weights (both 3 graphs; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def scale_to_float8(x: torch.Tensor, dtype: torch.dtype, rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape; [m, k] with `rows`) -> (x in `dtype` scaled so its absolute maximum — of each row with `rows` —
    maps to the format's maximum, the inverse scale: a float32 scalar tensor, or [m, 1] with `rows`)."""
    top = torch.finfo(dtype).max
    amax = x.abs().amax(dim=1, keepdim=True) if rows else x.abs().amax()
    scale = top / amax.float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def scaled_matmul(a: torch.Tensor, a_inv: torch.Tensor, b_t: torch.Tensor, b_inv: torch.Tensor, out_dtype, bias=None,
                  fast_accum: bool = False):
    """[m, k] fp8 row-major @ [k, n] fp8 column-major -> [m, n] in out_dtype (+ bias, fused unless the output is
    float32, which _scaled_mm cannot fuse it into). Scales: per tensor ([] each) or per row ([m, 1] and [1, n]).

    On a CPU, the fp8 values are multiplied as float32 (each is exact in float32, and so is each product): the same
    sums as `_scaled_mm`'s in another order, ~1000x faster than its CPU kernel (a 1200x128 @ 128x512 product took
    3.2 s against 2 ms on the 2-core test machine), so a CPU run of an fp8 path (tests, the demo) takes seconds."""
    if a.device.type == "cpu":
        out = (a.float() @ b_t.float()) * (a_inv * b_inv)  # [m, n] float32
        return (out if bias is None else out + bias).to(out_dtype)
    fused = bias if out_dtype != torch.float32 else None
    out = torch._scaled_mm(a, b_t, scale_a=a_inv, scale_b=b_inv, bias=fused, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out if bias is None or fused is not None else out + bias


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

    ROWS = False  # one scale per tensor (weight and input); Float8RowwiseLinear: per row

    def __init__(self, linear: torch.nn.Linear, quantized: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`quantized`: (weight in e4m3 [out, in], its inverse scale) made elsewhere (a `Float8Group`'s rows);
        else the linear's weight is quantised here."""
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, inv = quantized or scale_to_float8(linear.weight.detach(), E4M3, rows=self.ROWS)  # [out, in]; [] or [out, 1]
        self.register_buffer("weight_fp8", weight, persistent=False)
        self.register_buffer("weight_inv", inv.t().contiguous() if self.ROWS else inv, persistent=False)  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.weight = None  # type: ignore[assignment]  -- no bf16 copy is kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Float8Matmul.apply(x, self.weight_fp8, self.weight_inv, self.bias)

    def extra_repr(self) -> str:
        scaled = "per row (inference)" if self.ROWS else "per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 {scaled}"


class Float8RowwiseLinear(Float8FrozenLinear):
    """For inference: the weight scaled per output row, each input row scaled to e4m3 on its own, `_scaled_mm`
    with row-wise scales (bf16 out). Forward only: it has no backward."""

    ROWS = True
    FAST_ACCUM = False  # the tensor cores' faster, less exact fp8 accumulation (torchao's inference default)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Float8RowwiseLinear is for inference: it has no backward (train with fp8-matmul)")
        rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [m, in]
        xq, x_inv = scale_to_float8(rows, E4M3, rows=True)  # [m, in], [m, 1]
        out = scaled_matmul(xq, x_inv, self.weight_fp8.t(), self.weight_inv, x.dtype, self.bias, self.FAST_ACCUM)  # [m, out]
        return out.reshape(*x.shape[:-1], self.out_features)


class Float8Group(torch.nn.Module):
    """Frozen linears that read the same input (an attention's q, k and v) as one e4m3 weight [sum of outs, in]
    with one scale: one `_scaled_mm` (and one quantisation of the incoming gradient) instead of one each. The
    members are `Float8FrozenLinear`s over views of its rows with the shared scale, so a member called alone
    computes what its slice of the group computes; the group adds no memory."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        weight = torch.cat([linear.weight.detach() for linear in linears])  # [sum out, in]
        weight_fp8, inv = scale_to_float8(weight, E4M3)
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)
        self.register_buffer("weight_inv", inv, persistent=False)
        biases = [linear.bias for linear in linears]
        fused_bias = None if all(b is None for b in biases) else torch.cat(  # a member without one adds zeros
            [weight.new_zeros(n) if b is None else b.detach() for b, n in zip(biases, self.sizes)])
        self.register_buffer("bias", fused_bias, persistent=False)

    def members(self, linears: list[torch.nn.Linear]) -> list[Float8FrozenLinear]:
        """The linears as `Float8FrozenLinear`s over this group's rows (their biases stay their own)."""
        rows = self.weight_fp8.split(self.sizes)  # views: [out_i, in] each
        return [Float8FrozenLinear(linear, (row, self.weight_inv)) for linear, row in zip(linears, rows)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[..., in] -> [..., out_i] per member (views of one [..., sum out] product)."""
        return list(Float8Matmul.apply(x, self.weight_fp8, self.weight_inv, self.bias).split(self.sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, fp8 e4m3 per-tensor"


# The attention projections that read the same input, and the name of their group on the attention module
SHARED_INPUT = {"float8_qkv": ("to_q", "to_k", "to_v"), "float8_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def is_frozen_linear(module: torch.nn.Module) -> bool:
    """A plain nn.Linear whose weight does not train (the base's; LoRA's train)."""
    return type(module) is torch.nn.Linear and not module.weight.requires_grad


def frozen_linear(layer: torch.nn.Module) -> torch.nn.Linear | None:
    """A projection's frozen plain nn.Linear: the layer itself, or the base a peft LoRA layer wraps."""
    base = getattr(layer, "base_layer", layer)
    return base if is_frozen_linear(base) else None


def set_frozen_linear(layer_owner: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    layer = getattr(layer_owner, name)
    if hasattr(layer, "base_layer"):
        layer.base_layer = new
    else:
        setattr(layer_owner, name, new)


def group_shared_inputs(model: torch.nn.Module, min_features: int) -> None:
    """In place: each attention's q/k/v (and the text stream's) whose frozen linears all fit fp8 become the
    members of one `Float8Group`, registered on the attention as `float8_qkv` / `float8_added_qkv`."""
    for attn in [m for m in model.modules() if hasattr(m, "to_q")]:
        for group_name, names in SHARED_INPUT.items():
            linears = [frozen_linear(getattr(attn, n)) if hasattr(attn, n) else None for n in names]
            if any(linear is None or not fits_float8(linear, min_features) for linear in linears):
                continue
            group = Float8Group(linears)
            for name, member in zip(names, group.members(linears)):
                set_frozen_linear(attn, name, member)
            attn.add_module(group_name, group)


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
            if not is_frozen_linear(child) or "lora_" in fqn:
                continue
            new = replace(fqn, child)
            if new is not None:
                setattr(parent, child_name, new)


def convert_base(model: torch.nn.Module, min_features: int, inference: bool = False) -> None:
    """`fp8-matmul`'s frozen base, in place: the one-row-input linears (`ROW_INPUT`) as int8 per row, every other
    linear that fits (both dims >= `min_features`, multiples of 16) as fp8 matmuls (`inference`: row-wise scaled,
    forward only, with a placeholder weight for LoRAs loaded later); the rest stay as they are. For training, each
    attention's q/k/v share one scale and one weight (`group_shared_inputs`), which the training processor
    multiplies at once."""
    fp8 = Float8RowwiseLinear if inference else Float8FrozenLinear

    def replace(fqn: str, linear: torch.nn.Linear) -> torch.nn.Module | None:
        if any(s in fqn for s in ROW_INPUT):
            new = Int8RowwiseFrozenLinear(linear)
        else:
            new = fp8(linear) if fits_float8(linear, min_features) else None
        if new is not None and inference:
            placeholder_weight(new, linear.weight)
        return new

    if not inference:  # serving's row-wise linears are per row already; its grouping is not built
        group_shared_inputs(model, min_features)
    swap_frozen_linears(model, replace)


def placeholder_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """peft places an adapter loaded onto a layer by that layer's `weight` (its device, and its dtype for the
    adapter's): an empty non-persistent buffer of the original's dtype answers both and follows `.to()`. Training
    adds its LoRA before converting, so its layers keep `weight = None`."""
    del module.weight
    module.register_buffer("weight", weight.detach().new_empty(0), persistent=False)

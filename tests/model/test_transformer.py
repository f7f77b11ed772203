"""The trained model: frozen base (fp32/bf16, fp8 matmuls, int8/fp8 via torchao) + LoRA on the official targets,
and the block checkpointing choices."""

import pytest
import torch

from longcat_ray.config import OFFICIAL_LORA_TARGETS, LoraConfig, ModelConfig
from longcat_ray.model.loss import flow_matching_loss
from longcat_ray.model.transformer import (add_lora, checkpoint_blocks, graph_step_begin, load_transformer, place_base,
                                           quantize_base, speed_up_training)


def loss_and_grads(tiny, precision, checkpointing=(False, None), compile=False, memory_budget=None, fuse_qkv=True):
    model = ModelConfig(pretrained_model_name_or_path=str(tiny.model), base_model_precision=precision)
    transformer = load_transformer(model, torch.float32, torch.device("cpu"))
    checkpoint_blocks(transformer, *checkpointing)
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    place_base(transformer, precision, torch.device("cpu"))  # after the adapter, as the training worker does
    quantize_base(transformer, precision)
    # aot_eager: dynamo + AOT autograd's graph capture without generating kernels (fast on a CPU)
    speed_up_training(transformer, "sdpa", compile=compile, backend="aot_eager", memory_budget=memory_budget, fuse_qkv=fuse_qkv)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)  # B starts at zero: make the adapter contribute so A gets a gradient too
    g = torch.Generator().manual_seed(0)
    edit, ref, text = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 20, 64, generator=g)
    saved = []  # bytes of every tensor the forward keeps for the backward
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(1))
    loss.backward()
    transformer.saved_bytes = sum(saved)
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


def test_fp8_matmul_base_trains_the_lora(tiny):
    """fp8 matmuls on the frozen base: the LoRA trains through Float8FrozenLinear base layers, with the loss and
    the gradients' directions close to the full-precision base's."""
    from longcat_ray.model.fp8 import Float8FrozenLinear, Int8RowwiseFrozenLinear

    _, ref_params, reference = loss_and_grads(tiny, "no_change")
    transformer, params, loss = loss_and_grads(tiny, "fp8-matmul")
    assert isinstance(transformer.transformer_blocks[0].attn.to_q.base_layer, Float8FrozenLinear)
    modulation = [transformer.transformer_blocks[0].norm1.linear, transformer.single_transformer_blocks[0].norm.linear,
                  transformer.norm_out.linear, transformer.time_embed.timestep_embedder.linear_2]
    assert all(type(m) is Int8RowwiseFrozenLinear for m in modulation)  # one input row: int8, not fp8 matmuls
    assert not any("weight_fp8" in k or "weight_int8" in k for k in transformer.state_dict())  # no base weights
    assert loss == pytest.approx(reference, rel=0.05)
    # e4m3 forward, e5m2 gradients (2 mantissa bits): the LoRA's gradient points the same way as a whole; single
    # small tensors scatter more (over LoRA seeds 0-5 the smallest per-tensor cosine ranged 0.906-0.986, whole 0.996-0.998)
    assert cosine(params, ref_params) > 0.99
    assert all(cosine([mine], [plain]) > 0.9 for mine, plain in zip(params, ref_params))


def cosine(params, others) -> float:
    """Cosine between two sets of gradients, each flattened into one vector."""
    flat = lambda ps: torch.cat([p.grad.flatten() for p in ps])  # noqa: E731
    return torch.nn.functional.cosine_similarity(flat(params), flat(others), dim=0).item()


def test_fused_qkv_keeps_the_maths(tiny, monkeypatch):
    """fp8-matmul's q/k/v as one group: every attention's three projections (both streams of a double block) are
    views of one e4m3 weight; the training processor multiplies them at once, base and LoRA down-projections,
    and gets the loss and LoRA gradients of calling each projection alone."""
    from longcat_ray.model.fp8 import Float8Group

    original, calls = Float8Group.forward, []

    def counted(self, x):
        calls.append(self)
        return original(self, x)

    monkeypatch.setattr(Float8Group, "forward", counted)
    _, plain, reference = loss_and_grads(tiny, "fp8-matmul", fuse_qkv=False)
    assert calls == []  # unfused: each projection alone
    transformer, params, loss = loss_and_grads(tiny, "fp8-matmul", fuse_qkv=True)
    double, single = transformer.transformer_blocks[0].attn, transformer.single_transformer_blocks[0].attn
    groups = [double.float8_qkv, double.float8_added_qkv, single.float8_qkv]
    assert not hasattr(single, "float8_added_qkv") and len(calls) == len(groups)  # each group ran, once
    for group, names in zip(groups, [("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"), ("to_q", "to_k", "to_v")]):
        rows = group.weight_fp8.split(group.sizes)
        owner = double if group is not single.float8_qkv else single
        for name, row in zip(names, rows):
            member = getattr(owner, name).base_layer
            assert member.weight_fp8.data_ptr() == row.data_ptr() and member.weight_inv is group.weight_inv  # views, one scale
    assert loss == pytest.approx(reference, rel=1e-6)  # the forward is the same: same fp8 weights and input scale
    # the backward quantises q/k/v's gradients to e5m2 with one scale instead of three: other roundings, same size
    # (against the full-precision base, both 0.996-0.998 over LoRA seeds 0-5)
    assert cosine(params, plain) > 0.9999


def test_a_float8_group_keeps_each_members_bias():
    """The group's one product equals its members' own (views of its rows, its scale), a member without a bias
    included: the group adds zeros for it instead of dropping every member's bias."""
    from longcat_ray.model.fp8 import Float8Group

    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, 16), torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 32)]
    group = Float8Group(linears)
    x = torch.randn(2, 5, 32)
    for together, member in zip(group(x), group.members(linears)):
        torch.testing.assert_close(together, member(x), rtol=1e-5, atol=1e-5)


def test_fused_lora_down_projections_are_exact(tiny):
    """The fused processor's LoRA part alone: with an exact (unquantised) group of the bases, every loss and LoRA
    gradient equals calling each peft layer alone."""
    from longcat_ray.model.fp8 import SHARED_INPUT, frozen_linear

    class ExactGroup(torch.nn.Module):
        def __init__(self, linears):
            super().__init__()
            self.linears = linears  # a plain list: not registered, the model owns them

        def forward(self, x):
            weight, bias = torch.cat([lin.weight for lin in self.linears]), torch.cat([lin.bias for lin in self.linears])
            return list(torch.nn.functional.linear(x, weight, bias).split([lin.out_features for lin in self.linears], -1))

    def run(fuse: bool):
        transformer, params, _ = loss_and_grads(tiny, "no_change", fuse_qkv=fuse)
        for p in params:
            p.grad = None
        for attn in [m for m in transformer.modules() if hasattr(m, "to_q")]:
            for group_name, names in SHARED_INPUT.items():
                if hasattr(attn, names[0]):
                    object.__setattr__(attn, group_name, ExactGroup([frozen_linear(getattr(attn, n)) for n in names]))
        g = torch.Generator().manual_seed(0)
        edit, ref, text = (torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, 16, generator=g),
                           torch.randn(1, 20, 64, generator=g))
        loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(1))
        loss.backward()
        return loss.item(), params

    (reference, plain), (loss, params) = run(False), run(True)
    assert loss == pytest.approx(reference, rel=1e-6)
    for mine, theirs in zip(params, plain):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_int8_rowwise_linear_stays_within_its_rounding():
    """The modulation linears' int8 storage: each weight within half a step of its row's scale, so the output is
    within that bound times the input's L1 norm; the input's gradient flows; no weight is kept in bf16 or trained."""
    from longcat_ray.model.fp8 import Int8RowwiseFrozenLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).requires_grad_(False)
    with torch.no_grad():
        linear.weight[3] *= 50  # rows of very different ranges: one scale per row keeps each one's precision
    int8 = Int8RowwiseFrozenLinear(linear)
    x = torch.randn(2, 256, requires_grad=True)
    bound = int8.weight_scale / 2 * x.detach().abs().sum(-1, keepdim=True)  # [2, 96]
    error = (int8(x) - linear(x)).abs()
    assert (error <= bound + 1e-5).all() and error.max() > 0
    assert error[:, 3].max() > 10 * error[:, 0].max()  # the wide row rounds coarser, the others keep theirs
    int8(x).sum().backward()
    torch.testing.assert_close(x.grad, (int8.weight_int8.float() * int8.weight_scale[:, None]).sum(0).expand(2, -1))
    assert int8.weight is None and not list(int8.parameters())


@pytest.mark.parametrize("device,dtype,tokens,in_f,out_f", [
    ("cpu", torch.float32, 37, 64, 128),
    pytest.param("cuda", torch.bfloat16, 5318, 3072, 12288, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
])
def test_rowwise_fp8_linear_rows_stand_alone(device, dtype, tokens, in_f, out_f):
    """Serving's fp8 linear: close to the original; each row's output independent of the other rows in its batch
    (one row scaled 1000x leaves the rest bit-equal); no backward."""
    from longcat_ray.model.fp8 import Float8RowwiseLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, device=device, dtype=dtype).requires_grad_(False)
    fp8 = Float8RowwiseLinear(linear)
    x = torch.randn(2, tokens, in_f, device=device, dtype=dtype)
    out = fp8(x)
    assert ((out.float() - linear(x).float()).norm() / linear(x).float().norm()).item() < 0.05
    loud = x.clone()
    loud[1, 0] *= 1000
    assert torch.equal(fp8(loud)[0], out[0]) and torch.equal(fp8(loud)[1, 1:], out[1, 1:])
    with pytest.raises(RuntimeError, match="no backward"):
        fp8(x.requires_grad_())


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_the_cpu_fp8_matmul_sums_what_scaled_mm_sums(rows, out_dtype):
    """On a CPU, scaled_matmul multiplies the fp8 values in float32 instead of calling `_scaled_mm` (whose CPU kernel
    is ~1000x slower): the same result as `_scaled_mm` but for the order of the sums (per-tensor and per-row scales,
    bias, both output types)."""
    from longcat_ray.model.fp8 import E4M3, scale_to_float8, scaled_matmul

    torch.manual_seed(0)
    a, b, bias = torch.randn(48, 64) * 3, torch.randn(32, 64), torch.randn(32).to(out_dtype)
    aq, a_inv = scale_to_float8(a, E4M3, rows=rows)  # [48, 64], [] or [48, 1]
    bq, b_inv = scale_to_float8(b, E4M3, rows=rows)  # [32, 64], [] or [32, 1]
    b_inv = b_inv.t().contiguous() if rows else b_inv  # [1, 32]
    fused = bias if out_dtype != torch.float32 else None
    theirs = torch._scaled_mm(aq, bq.t(), scale_a=a_inv, scale_b=b_inv, bias=fused, out_dtype=out_dtype)
    theirs = theirs if fused is not None else theirs + bias
    mine = scaled_matmul(aq, a_inv, bq.t(), b_inv, out_dtype, bias)
    assert mine.dtype == out_dtype
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if out_dtype == torch.float32 else {"atol": 0.0, "rtol": 2 ** -7}
    torch.testing.assert_close(mine, theirs, **tolerance)  # bf16: at most one rounding step apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp8_linear_on_gpu_at_dit_shapes():
    """A 3072 -> 12288 linear over 5318 tokens (text + image, not a multiple of 16): fp8 output and input
    gradient within a few percent of bf16's, no weight gradient, bias fused."""
    from longcat_ray.model.fp8 import Float8FrozenLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    fp8 = Float8FrozenLinear(linear)
    x = torch.randn(1, 5318, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, 5318, 12288, device="cuda", dtype=torch.bfloat16)
    (fp8(x) * grad).sum().backward()
    mine, x.grad = x.grad, None
    (linear(x) * grad).sum().backward()
    relative = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert relative(fp8(x), linear(x)) < 0.05
    assert relative(mine, x.grad) < 0.08


def test_compiled_blocks_keep_the_maths(tiny):
    """Regional compile with the training attention: the same loss and LoRA gradients as eager."""
    _, plain, reference = loss_and_grads(tiny, "no_change")
    _, params, loss = loss_and_grads(tiny, "no_change", compile=True)
    assert loss == pytest.approx(reference, rel=1e-6)
    for mine, theirs in zip(params, plain):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_the_compilers_recomputation_keeps_the_maths_in_less_memory(tiny):
    """`activation_memory_budget`: the compiled blocks keep a smaller share of their activations and recompute the
    rest in the backward; the loss and LoRA gradients stay the uncompiled model's."""
    _, plain, reference = loss_and_grads(tiny, "no_change")  # conftest's compiler_config_restored resets the budget
    kept = []
    for budget in (1.0, 0.0):
        torch._dynamo.reset()  # each budget partitions its own graphs
        transformer, params, loss = loss_and_grads(tiny, "no_change", compile=True, memory_budget=budget)
        kept.append(transformer.saved_bytes)
        assert loss == pytest.approx(reference, rel=1e-6)
        for mine, theirs in zip(params, plain):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert kept[1] < 0.8 * kept[0], kept


def small_model_loss_and_grads(checkpointing):
    """A 3 double + 4 single block DiT (the tiny preset has one of each, too few for an interval to matter)
    with a LoRA: -> (transformer, LoRA params, loss), gradients filled."""
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(0)
    transformer = LongCatImageTransformer2DModel(num_layers=3, num_single_layers=4, attention_head_dim=8, num_attention_heads=2,
                                                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    transformer.requires_grad_(False)
    checkpoint_blocks(transformer, *checkpointing)
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    g = torch.Generator().manual_seed(0)
    edit, ref, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 12, 16, generator=g)
    loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(1))
    loss.backward()
    return transformer, params, loss.item()


@pytest.mark.parametrize("checkpointing", [(True, None), (True, 2)])
def test_checkpointing_keeps_the_maths(checkpointing):
    """Full and every-other-block checkpointing: the same loss and LoRA gradients as keeping every activation."""
    _, plain, reference = small_model_loss_and_grads((False, None))
    transformer, params, loss = small_model_loss_and_grads(checkpointing)
    every = checkpointing[1] or 1
    assert transformer.use_checkpoint == [i % every == 0 for i in range(len(transformer.transformer_blocks))]
    assert loss == pytest.approx(reference, rel=1e-6)
    for mine, theirs in zip(params, plain):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)


def test_checkpointing_interval_picks_every_nth_block():
    transformer, _, _ = small_model_loss_and_grads((True, 2))
    assert transformer.gradient_checkpointing
    assert transformer.use_checkpoint == [True, False, True]
    assert transformer.use_single_checkpoint == [True, False, True, False]
    checkpoint_blocks(transformer, False, 2)
    assert not transformer.gradient_checkpointing




def compiled_steps(tiny, cuda_graphs: bool, widths: tuple[int, ...], steps: int = 4):
    """`steps` SGD steps of the tiny DiT's LoRA on a GPU, its blocks compiled by inductor, each step one micro-batch
    per latent width in `widths` (two: two bucket shapes and gradient accumulation), and a validation-like forward
    without gradients (eager, as TrainingLoop.validate runs it under CUDA graphs) after the second step -> (losses, LoRA)."""
    torch._dynamo.reset()
    model = ModelConfig(pretrained_model_name_or_path=str(tiny.model))
    transformer = load_transformer(model, torch.bfloat16, torch.device("cpu"))
    params = add_lora(transformer, LoraConfig(rank=4), seed=0)
    place_base(transformer, "no_change", torch.device("cuda"))
    speed_up_training(transformer, "sdpa", compile=True, cuda_graphs=cuda_graphs)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randn(shape, generator=g).cuda().bfloat16() for shape in ((1, 16, 16, w), (1, 16, 16, w), (1, 20, 64))]
               for w in widths]
    losses = []
    for step in range(steps):
        for micro, (edit, ref, text) in enumerate(batches):
            if cuda_graphs:
                graph_step_begin(params)  # as TrainingLoop does
            loss = flow_matching_loss(transformer, edit, ref, text, torch.Generator().manual_seed(2 * step + micro))
            (loss / len(batches)).backward()
            losses.append(loss.item())
        with torch.no_grad():
            for p in params:
                p.sub_(0.5 * p.grad)
                p.grad = None
        if step == 1:
            with torch.no_grad(), torch.compiler.set_stance("force_eager" if cuda_graphs else "default"):
                losses.append(flow_matching_loss(transformer, *batches[0], torch.Generator().manual_seed(99)).item())
    return losses, [p.detach().float().cpu() for p in params]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("widths", [(16,), (16, 24)])
def test_cuda_graphs_train_as_the_compiled_blocks(tiny, widths):
    """`cuda_graphs` replays the compiled blocks' kernels: the same losses and LoRA after 4 steps (warm-up,
    recording, replays, an eager forward between steps) as the compiled blocks launched one by one; with two
    shapes accumulated per step too (without graph_step_begin's gradients it stopped: "accessing tensor output of
    CUDAGraphs that has been overwritten", H200, 2026-12-02; one shape accumulated twice stops the same way)."""
    losses, lora = compiled_steps(tiny, cuda_graphs=False, widths=widths)
    graphed, graphed_lora = compiled_steps(tiny, cuda_graphs=True, widths=widths)
    assert graphed == pytest.approx(losses, rel=1e-3)
    assert all(torch.allclose(a, b, rtol=1e-2, atol=1e-4) for a, b in zip(graphed_lora, lora))


# compile_dynamic -> per compile, symbolic sizes? True: symbolic from the first, yet the square first shape's guards
# (height == width) do not hold for the second, which compiles once more
SHAPE_CASES = [(False, [False, False, False]), (None, [False, True]), (True, [True, True])]


def compiled_graphs_over_bucket_shapes(tiny, dynamic, device: str, backend_name: str, rel: float) -> list[bool]:
    """Three bucket shapes (64, 32 and 48 image tokens per image) through the compiled blocks with a LoRA, forward and
    backward, each loss checked against the uncompiled model's (within `rel`) -> per compiled forward graph (one per
    block class and shape that compiles): has it symbolic sizes?"""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def backend(gm, inputs):
        values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
        graphs.append(any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor) and any(
            isinstance(d, torch.SymInt) for d in v.shape) for v in values))
        return lookup_backend(backend_name)(gm, inputs)

    torch._dynamo.reset()
    model = ModelConfig(pretrained_model_name_or_path=str(tiny.model))
    plain, compiled = (load_transformer(model, torch.float32, torch.device(device)) for _ in range(2))
    add_lora(compiled, LoraConfig(rank=4), seed=0)  # B = 0: the same outputs as the plain model, and a backward
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 20, 64, generator=g).to(device)
    # the recompile limit speed_up_training raises holds for the whole test, as in a worker (conftest restores it)
    speed_up_training(compiled, "sdpa", compile=True, backend=backend, dynamic=dynamic)
    for height, width in ((16, 16), (8, 16), (8, 24)):
        edit, ref = (torch.randn(1, 16, height, width, generator=g).to(device) for _ in range(2))
        got = flow_matching_loss(compiled, edit, ref, text, torch.Generator().manual_seed(1))
        got.backward()
        with torch.no_grad():
            want = flow_matching_loss(plain, edit, ref, text, torch.Generator().manual_seed(1))
        assert got.item() == pytest.approx(want.item(), rel=rel)
    return graphs


@pytest.mark.parametrize("dynamic,symbolic", SHAPE_CASES)
def test_bucket_shapes_compile_statically_or_once_symbolically(tiny, dynamic, symbolic):
    """The blocks' compile `dynamic` (what `compile_dynamic` resolves to): False compiles each bucket shape for its
    exact sizes; None (torch's default) compiles the first shape exactly and the second with symbolic sizes, which
    then serve the third; True compiles symbolically from the first. Every shape keeps the uncompiled model's loss."""
    graphs = compiled_graphs_over_bucket_shapes(tiny, dynamic, "cpu", "aot_eager", rel=1e-6)
    assert graphs == [flag for flag in symbolic for _ in range(2)], graphs  # two block classes: a graph each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dynamic,symbolic", SHAPE_CASES)
def test_bucket_shapes_compile_with_inductor_on_a_gpu(tiny, dynamic, symbolic):
    """The same with inductor's kernels on the GPU (fp32; inductor's own reductions and fusions: rel 1e-4)."""
    graphs = compiled_graphs_over_bucket_shapes(tiny, dynamic, "cuda", "inductor", rel=1e-4)
    assert graphs == [flag for flag in symbolic for _ in range(2)], graphs

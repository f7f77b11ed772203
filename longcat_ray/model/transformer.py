"""The trained model: LongCat's DiT, frozen (bf16 / fp8 matmuls / int8 or fp8 weight-only via torchao), with a
peft LoRA adapter, and the training-speed levers that keep its maths (attention kernel, regional compile,
which blocks recompute their activations)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from longcat_ray.config import WEIGHT_ONLY, LoraConfig, ModelConfig

ADAPTER = "default"


def load_transformer(model: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The DiT from a pipeline folder or hub id, frozen, on `device` (the training worker loads on the CPU and
    moves it with `place_base`, after the LoRA is attached)."""
    from diffusers import LongCatImageTransformer2DModel

    transformer = LongCatImageTransformer2DModel.from_pretrained(
        model.pretrained_model_name_or_path, subfolder="transformer", revision=model.revision, dtype=dtype
    ).to(device)
    return transformer.requires_grad_(False)


def place_base(transformer, precision: str, device: torch.device) -> None:
    """Moves the DiT to `device` one block at a time; `fp8-matmul` converts each block's frozen linears
    (model/fp8.py) as it arrives, so the device never holds the whole bf16 base beside its fp8 copy (the full DiT
    is 11.7 GiB in bf16, 5.8 GiB converted)."""
    from longcat_ray.model.fp8 import convert_base

    pieces = [*transformer.transformer_blocks, *transformer.single_transformer_blocks, transformer]
    for piece in pieces:  # the last piece moves what is left: embedders, final norm, output projection
        piece.to(device)
        if precision == "fp8-matmul":
            # linears narrower than the model (the 64-channel patch embedder and output projection) stay in bf16
            convert_base(piece, min_features=transformer.inner_dim)


def quantize_base(transformer, precision: str) -> None:
    """torchao's weight-only int8/fp8 for the frozen linears (never LoRA's), in place; other precisions are
    placed by `place_base`.

    Runs after the LoRA is attached and after DeepSpeed has placed the model: peft then wraps plain bf16
    linears, and DeepSpeed's `module.to(device)` never meets a torchao tensor subclass (it cannot swap one:
    "Couldn't swap Linear.weight" on an H200).
    """
    if precision not in WEIGHT_ONLY:
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if precision == "int8-torchao" else Float8WeightOnlyConfig()
    quantize_(transformer, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lora_" not in fqn)


def add_lora(transformer, lora: LoraConfig, seed: int) -> list[torch.nn.Parameter]:
    """Attach the adapter (initialised from `seed`, identically on every rank); returns its parameters."""
    from peft import LoraConfig as PeftLoraConfig

    torch.manual_seed(seed)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or lora.rank,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=True,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for param in params:
        param.requires_grad_(True)
    return params


def checkpoint_blocks(transformer, enabled: bool, interval: int | None) -> None:
    """Gradient checkpointing of every block, or (SimpleTuner's `gradient_checkpointing_interval`) of every
    `interval`-th double and single block: the rest keep their activations and skip the recomputation."""
    if not enabled:
        transformer.disable_gradient_checkpointing()
        return
    transformer.enable_gradient_checkpointing()
    every = interval or 1
    transformer.use_checkpoint = [i % every == 0 for i in range(len(transformer.transformer_blocks))]
    transformer.use_single_checkpoint = [i % every == 0 for i in range(len(transformer.single_transformer_blocks))]


def graph_step_begin(params: list[torch.nn.Parameter]) -> None:
    """Before each micro-step's forward under `cuda_graphs`: a new generation of the graph tree (the last one's outputs
    may then be overwritten), and every LoRA gradient allocated if it is not. A gradient the backward makes is a graph
    output, and autograd keeps that very tensor as `.grad` when the parameter has none: the next micro-step's
    replays would overwrite it before the optimizer step reads it (with gradient accumulation: torch's "accessing
    tensor output of CUDAGraphs that has been overwritten by a subsequent run", found on an H200). Into an existing
    `.grad` autograd adds in place (0 + g is exact), so nothing the optimizer reads lives in the graphs' pool."""
    torch.compiler.cudagraph_mark_step_begin()
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)


STATIC_SHAPES = 64  # bucket shapes a `dynamic=False` compile keeps before torch falls back to running eagerly


def speed_up_training(transformer, attention: str, compile: bool, backend: str | Callable = "inductor",
                      cpp_wrapper: bool = False, memory_budget: float | None = None, fuse_qkv: bool = True,
                      cuda_graphs: bool = False, dynamic: bool | None = None) -> None:
    """Exact-maths levers: the attention kernel (model/attention.py) and a regional torch.compile of the
    repeated blocks (fuses the norms, modulation, rotary embedding and the fp8 scaling between the matmuls).
    `backend`: torch.compile's, a name or a function (tests use aot_eager: the same graph capture without generating
    kernels);
    `cpp_wrapper`: inductor's C++ wrapper around the kernels instead of Python; `memory_budget`: the share of the
    compiled blocks' activations kept for the backward (the partitioner recomputes the rest, cheapest FLOPs first);
    `fuse_qkv`: each attention's q/k/v as one matmul where the base is grouped (model/attention.py); `cuda_graphs`:
    the compiled blocks replayed as CUDA graphs (inductor's `reduce-overhead`; the caller starts each micro-step with
    `graph_step_begin`); `dynamic`: torch.compile's, for new bucket shapes (False: one static compile per shape)."""
    from longcat_ray.model.attention import use_training_attention

    use_training_attention(transformer, attention, fuse_qkv)
    if compile:
        if memory_budget is not None:
            import torch._functorch.config as functorch

            # process-wide, read when each block's forward and backward are partitioned (its first call): the
            # training worker's process compiles nothing else that trains
            functorch.activation_memory_budget = memory_budget
        if cpp_wrapper and backend == "inductor":
            # process-wide: a per-compile option misses the backward, compiled later (pytorch#178845: "CudaKernelParamCache
            # not populated", hit on the H200 with torch 2.11)
            import torch._inductor.config as inductor

            inductor.cpp_wrapper = True
        if dynamic is False:  # one entry per bucket shape in each block's compile cache (torch's limit is 8)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, STATIC_SHAPES)
        mode = {"mode": "reduce-overhead"} if cuda_graphs else {}
        transformer.compile_repeated_blocks(fullgraph=False, backend=backend, dynamic=dynamic, **mode)

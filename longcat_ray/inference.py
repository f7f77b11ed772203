"""The one inference path: (components, reference, instruction, size, steps, guidance, seed) -> image.

Same math as diffusers' LongCatImageEditPipeline, but at an explicit width x height (the pipeline forces
~1 MP) and built from the functions training uses. Validation calls `edit_image`; Serve batches requests through `edit_images`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from longcat_ray.buckets import resize_image
from longcat_ray.lora_files import LoraError, LoraWeights, read_lora
from longcat_ray.model import flow
from longcat_ray.model.latents import (
    PIXELS_PER_TOKEN,
    VAE_SCALE,
    decode_latents,
    encode_latents,
    image_to_tensor,
    pack_latents,
    tensor_to_images,
    unpack_latents,
)
from longcat_ray.model.prompt import encode_prompts, pipeline_prompt_encoder, vl_image
from longcat_ray.model.vision import speed_up_vision

LATENT_CHANNELS = 16


@dataclass(kw_only=True)
class EditRequest:
    """One edit: the instruction and how to sample it."""

    prompt: str
    width: int
    height: int
    steps: int = 40
    guidance: float = 4.5
    seed: int = 0
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
                near = max(PIXELS_PER_TOKEN, round(value / PIXELS_PER_TOKEN) * PIXELS_PER_TOKEN)
                raise ValueError(f"{name} {value} is off the {PIXELS_PER_TOKEN}-px grid; nearest valid: {near}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A LongCatImageEditPipeline from a local folder or a hub id, on `device` (bf16 on GPU, fp32 on CPU)."""
    from diffusers import LongCatImageEditPipeline

    device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = LongCatImageEditPipeline.from_pretrained(name_or_path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    speed_up_vision(pipe.text_encoder)
    return pipe.to(device)


def batch_key(request: EditRequest) -> tuple:
    """Requests with equal keys can share one batched denoising loop (same token grid, steps and CFG on/off)."""
    return request.width, request.height, request.steps, request.guidance > 1


def encode_condition(
    pipe, references: list[Image.Image], requests: list[EditRequest]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (packed reference latents [b, n, 64], prompt embeds [b, L, d], negative embeds [b, L, d] or None).

    All requests share one batch_key (so one L and one n)."""
    width, height = requests[0].width, requests[0].height
    sized = [resize_image(ref.convert("RGB"), width, height) for ref in references]
    vls = [vl_image(image, width, height) for image in sized]
    prompts = [r.prompt for r in requests]
    cfg = requests[0].guidance > 1
    if cfg:
        # The negative prompt is encoded with the same reference image, as the pipeline does; one VL forward
        # encodes both (the batch rows are independent).
        prompts += [r.negative_prompt for r in requests]
    embeds = encode_prompts(*pipeline_prompt_encoder(pipe), prompts, vls * (2 if cfg else 1))
    embeds, negative = (embeds.chunk(2) if cfg else (embeds, None))
    latents = pack_latents(encode_latents(pipe.vae, image_to_tensor(sized)))
    return latents.to(pipe.transformer.dtype), embeds, negative


def initial_noise(request: EditRequest, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Seeded noise drawn on the CPU (same numbers on every device) -> packed [1, n, 64]."""
    shape = (1, LATENT_CHANNELS, request.height // VAE_SCALE, request.width // VAE_SCALE)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    return pack_latents(randn_tensor(shape, generator=generator, device=device, dtype=dtype))


def guide_rows(cond: torch.Tensor, uncond: torch.Tensor, requests: list[EditRequest]) -> torch.Tensor:
    """CFG per batch row with each request's own scale (a Python float, as the pipeline multiplies)."""
    return torch.cat([flow.guide(cond[i : i + 1], uncond[i : i + 1], r.guidance) for i, r in enumerate(requests)])


@torch.no_grad()
def denoise(
    transformer,
    ref_latents: torch.Tensor,
    embeds: torch.Tensor,
    negative: torch.Tensor | None,
    requests: list[EditRequest],
    preview: Callable[[int, torch.Tensor], None] | None = None,
    cfg_batch: bool = True,
) -> torch.Tensor:
    """The sampling loop: packed references [b, n, 64] + prompt (and negative) embeddings [b, L, d] -> packed
    latents [b, n, 64]. Each row starts from its own request's seeded noise, so a request gives the same image
    alone or batched. Training's validation calls this with cached conditioning; `edit_images` with fresh.

    cfg_batch: the conditional and unconditional passes share one forward of batch 2b (the pipeline makes two
    calls; same math, larger matrix products)."""
    dtype = ref_latents.dtype
    latents = torch.cat([initial_noise(r, ref_latents.device, dtype) for r in requests])
    first = requests[0]
    rows, cols = first.height // PIXELS_PER_TOKEN, first.width // PIXELS_PER_TOKEN
    txt_ids, img_ids = flow.edit_position_ids(embeds.shape[1], rows, cols)
    sigmas = flow.inference_sigmas(first.steps, flow.shift_mu(rows * cols))
    embeds = embeds.to(dtype)
    negative = negative.to(dtype) if negative is not None else None
    for step in range(first.steps):
        sigma = sigmas[step : step + 1].expand(len(requests))
        if negative is not None and cfg_batch:
            both = flow.predict_velocity(transformer, latents.repeat(2, 1, 1), ref_latents.repeat(2, 1, 1),
                                         torch.cat([embeds, negative]), txt_ids, img_ids, sigma.repeat(2))
            velocity = guide_rows(*both.chunk(2), requests)
        else:
            velocity = flow.predict_velocity(transformer, latents, ref_latents, embeds, txt_ids, img_ids, sigma)
        if negative is not None and not cfg_batch:
            uncond = flow.predict_velocity(transformer, latents, ref_latents, negative, txt_ids, img_ids, sigma)
            velocity = guide_rows(velocity, uncond, requests)
        latents = flow.euler_step(latents, velocity, float(sigmas[step]), float(sigmas[step + 1]))
        if preview is not None:
            preview(step, latents)
    return latents


def decode_image(vae, latents: torch.Tensor, width: int, height: int) -> Image.Image:
    """Packed latents of a width x height image -> the image."""
    return decode_images(vae, latents, width, height)[0]


def decode_images(vae, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """Packed latents [b, n, 64] of width x height images -> the images."""
    return tensor_to_images(decode_latents(vae, unpack_latents(latents, height, width)))


@torch.no_grad()
def edit_images(pipe, references: list[Image.Image], requests: list[EditRequest],
                on_step: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """Edit each reference by its request, in one batch; the requests must share one `batch_key`.
    `on_step(steps done, steps in all)` is called after each denoising step if given."""
    if len({batch_key(r) for r in requests}) != 1:
        raise ValueError(f"one batch needs one size, step count and CFG on/off; got {sorted({batch_key(r) for r in requests})}")
    ref_latents, embeds, negative = encode_condition(pipe, references, requests)
    preview = None if on_step is None else lambda step, _latents: on_step(step + 1, requests[0].steps)
    latents = denoise(pipe.transformer, ref_latents, embeds, negative, requests, preview)
    return decode_images(pipe.vae, latents, requests[0].width, requests[0].height)


@torch.no_grad()
def edit_image(
    pipe,
    reference: Image.Image,
    request: EditRequest,
    preview: Callable[[int, torch.Tensor], None] | None = None,
) -> Image.Image:
    """Edit `reference` by `request`; `preview(step, packed latents)` is called after each step if given."""
    ref_latents, embeds, negative = encode_condition(pipe, [reference], [request])
    latents = denoise(pipe.transformer, ref_latents, embeds, negative, [request], preview)
    return decode_image(pipe.vae, latents, request.width, request.height)


def parse_lora(spec: str) -> tuple[str, float]:
    """`path` or `path:scale` (a Windows-style `C:` prefix is not a scale)."""
    path, _, scale = spec.rpartition(":")
    try:
        return (path, float(scale)) if path else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def check_lora(transformer, weights: LoraWeights) -> None:
    """Every factor must fit a linear layer of this transformer: another base model or a config mismatch is
    reported key by key instead of a bare size-mismatch traceback."""
    modules = dict(transformer.named_modules())
    problems = []
    for name, tensor in weights.state.items():
        module_name, _, kind = name.rpartition(".lora_")
        key = weights.origin[name]
        module = modules.get(module_name)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{key}: no linear layer '{module_name}' in this transformer")
        elif kind.startswith("A") and tensor.shape[1] != base.in_features:
            problems.append(f"{key}: shape {list(tensor.shape)} does not fit in_features {base.in_features} of '{module_name}'")
        elif kind.startswith("B") and tensor.shape[0] != base.out_features:
            problems.append(f"{key}: shape {list(tensor.shape)} does not fit out_features {base.out_features} of '{module_name}'")
    if problems:
        listed = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LoraError(f"{weights.file} does not fit this base model ({len(problems)} key(s)):\n  {listed}")


def load_lora(transformer, path: str, name: str) -> LoraWeights:
    """Load a LoRA of any supported layout (longcat_ray/lora_files.py) under adapter `name`, at the strength its
    file or config says."""
    weights = read_checked_lora(transformer, path)
    add_lora_weights(transformer, weights, name)
    return weights


def read_checked_lora(transformer, path: str) -> LoraWeights:
    """A LoRA file of any supported layout, checked against this transformer (LoraError naming the file)."""
    module_names = [module_name for module_name, _ in transformer.named_modules()]
    weights = read_lora(path, [n.removesuffix(".base_layer") for n in module_names if n])
    check_lora(transformer, weights)
    return weights


def add_lora_weights(transformer, weights: LoraWeights, name: str) -> None:
    """Checked weights -> adapter `name` of the transformer (peft layers made on the meta device and filled from
    `weights`: no random init of weights the file overwrites)."""
    try:
        transformer.load_lora_adapter(dict(weights.state), prefix=None, adapter_name=name, metadata=weights.lora_config(),
                                      low_cpu_mem_usage=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:  # diffusers/peft's own refusals, named by file
        raise LoraError(f"{weights.file}: {err}") from None


class Editor:
    """A loaded pipeline plus the inference path: what the CLI, validation and Serve hold."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loras: dict[str, str] = {}

    def add_lora(self, path: str, name: str | None = None) -> str:
        name = name or f"lora{len(self.loras)}"
        load_lora(self.pipe.transformer, path, name)
        self.loras[name] = path
        return name

    def use_loras(self, scales: dict[str, float]) -> None:
        """Activate exactly these adapters with these scales (none: the base model)."""
        transformer = self.pipe.transformer
        if not self.loras:
            return
        if scales:
            transformer.enable_adapters()
            set_lora_scales(transformer, scales)
        else:
            transformer.disable_adapters()

    def edit(self, reference: Image.Image, request: EditRequest, preview=None) -> Image.Image:
        return edit_image(self.pipe, reference, request, preview)


def set_lora_scales(transformer, scales: dict[str, float]) -> None:
    """Activate these adapters at these strengths, as diffusers' `set_adapters(names, weights)` does, but each
    layer's scale (strength x alpha / rank, peft's own formula) lives in one 0-dim CPU float64 tensor per layer and
    adapter, changed in place: a compiled DiT reads it as an input instead of guarding on a Python float, so a new
    strength does not recompile (it did: 2 graphs per new value). CPU float64, as Python floats enter the product
    (`lora_B(...) * scaling`): the same numbers. A new adapter under a deleted one's name reuses its tensors."""
    from peft.tuners.lora.layer import LoraLayer

    for module in transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        module.set_adapter(list(scales), inference_mode=True)  # no requires_grad flags flipped on
        held = module.__dict__.setdefault("held_scaling", {})
        for name, strength in scales.items():
            if name not in module.scaling:
                continue
            module.set_scale(name, strength)  # peft's float: strength * alpha / r (or / sqrt(r) with rslora)
            value = float(module.scaling[name])
            if name not in held:
                held[name] = torch.tensor(value, dtype=torch.float64)
            module.scaling[name] = held[name].fill_(value)


def load_editor(name_or_path: str, device: str | None = None, loras: list[str] = (), offload: str = "none") -> Editor:
    """Pipeline + LoRAs (`path[:scale]`, all active). offload: none | model | group (GPU memory levers)."""
    editor = Editor(load_pipeline(name_or_path, device=device if offload == "none" else "cpu"))
    scales = {}
    for spec in loras:
        path, scale = parse_lora(spec)
        scales[editor.add_lora(path)] = scale
    editor.use_loras(scales)
    apply_offload(editor.pipe, offload)
    return editor


def speed_up(pipe, quantize: str = "none", compile: bool = False) -> None:
    """Inference-only levers on a GPU (no-ops on the CPU): cuDNN attention (its forward is the fastest at these
    shapes; only its backward fails, which inference never runs), optional fp8 matmuls for the DiT's linears
    (`quantize_dit`), optional regional torch.compile of the repeated blocks (compiles per new size/batch shape;
    LoRAs still load and switch)."""
    if not torch.cuda.is_available() or pipe.device.type != "cuda":
        return
    torch.backends.cuda.enable_cudnn_sdp(True)
    quantize_dit(pipe.transformer, quantize)
    if compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        pipe.transformer.compile_repeated_blocks(fullgraph=True)


def quantize_dit(transformer, quantize: str) -> None:
    """`fp8`: the DiT's frozen linears as training's `fp8-matmul` base converts them (model/fp8.py), with scales
    per token row and per output row (a request's output does not depend on what shares its batch); the modulation
    linears in int8. Approximates bf16. LoRAs load onto the converted layers as onto any Linear. `fp8-fast`: the
    same with the tensor cores' fast fp8 accumulation (torchao's inference default; less exact)."""
    if quantize in ("fp8", "fp8-fast"):
        from longcat_ray.model.fp8 import convert_base

        convert_base(transformer.requires_grad_(False), min_features=transformer.inner_dim, inference=True)
        set_fast_accum(transformer, quantize == "fp8-fast")
    elif quantize != "none":
        raise ValueError(f"quantize must be none, fp8 or fp8-fast, got {quantize!r}")


def set_fast_accum(transformer, on: bool) -> None:
    """The fp8 DiT's matmuls with the tensor cores' fast accumulation or the exact one (per converted layer; a
    compiled DiT recompiles)."""
    from longcat_ray.model.fp8 import Float8RowwiseLinear

    for module in transformer.modules():
        if isinstance(module, Float8RowwiseLinear):
            module.FAST_ACCUM = on


def apply_offload(pipe, offload: str) -> None:
    """diffusers' memory levers: whole components (model) or groups of blocks (group) live on the CPU and
    move to the GPU as they run. Only meaningful with a GPU."""
    if offload == "none" or not torch.cuda.is_available():
        return
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "group":
        pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1)
    else:
        raise ValueError(f"offload must be none, model or group, got {offload!r}")

"""The one inference path: (components, reference, instruction, size, steps, guidance, seed) -> image.

Same math as diffusers' LongCatImageEditPipeline, but at an explicit width x height (the pipeline forces
~1 MP) and built from the functions training uses. Validation and Serve both call `edit_image`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from longcat_ray.model import flow
from longcat_ray.model.latents import (
    PIXELS_PER_TOKEN,
    VAE_SCALE,
    decode_latents,
    encode_latents,
    image_to_tensor,
    pack_latents,
    resize_image,
    tensor_to_images,
    unpack_latents,
)
from longcat_ray.model.prompt import encode_prompts, pipeline_prompt_encoder, vl_image

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
    pipe = LongCatImageEditPipeline.from_pretrained(name_or_path, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def encode_condition(pipe, reference: Image.Image, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (packed reference latents [1, n, 64], prompt embeds [1, L, d], negative embeds or None)."""
    sized = resize_image(reference.convert("RGB"), request.width, request.height)
    vl = vl_image(sized, request.width, request.height)
    embeds = encode_prompts(*pipeline_prompt_encoder(pipe), [request.prompt], [vl])
    negative = None
    if request.guidance > 1:
        # The negative prompt is encoded with the same reference image, as the pipeline does.
        negative = encode_prompts(*pipeline_prompt_encoder(pipe), [request.negative_prompt], [vl])
    latents = pack_latents(encode_latents(pipe.vae, image_to_tensor([sized])))
    return latents.to(pipe.transformer.dtype), embeds, negative


def initial_noise(request: EditRequest, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Seeded noise drawn on the CPU (same numbers on every device) -> packed [1, n, 64]."""
    shape = (1, LATENT_CHANNELS, request.height // VAE_SCALE, request.width // VAE_SCALE)
    generator = torch.Generator("cpu").manual_seed(request.seed)
    return pack_latents(randn_tensor(shape, generator=generator, device=device, dtype=dtype))


@torch.no_grad()
def edit_image(
    pipe,
    reference: Image.Image,
    request: EditRequest,
    preview: Callable[[int, torch.Tensor], None] | None = None,
) -> Image.Image:
    """Edit `reference` by `request`; `preview(step, packed latents)` is called after each step if given."""
    transformer = pipe.transformer
    ref_latents, embeds, negative = encode_condition(pipe, reference, request)
    latents = initial_noise(request, ref_latents.device, ref_latents.dtype)
    rows, cols = request.height // PIXELS_PER_TOKEN, request.width // PIXELS_PER_TOKEN
    txt_ids, img_ids = flow.edit_position_ids(embeds.shape[1], rows, cols)
    sigmas = flow.inference_sigmas(request.steps, flow.shift_mu(rows * cols))
    embeds, negative = embeds.to(transformer.dtype), negative.to(transformer.dtype) if negative is not None else None
    for step in range(request.steps):
        sigma = sigmas[step : step + 1]
        velocity = flow.predict_velocity(transformer, latents, ref_latents, embeds, txt_ids, img_ids, sigma)
        if negative is not None:
            uncond = flow.predict_velocity(transformer, latents, ref_latents, negative, txt_ids, img_ids, sigma)
            velocity = flow.guide(velocity, uncond, request.guidance)
        latents = flow.euler_step(latents, velocity, float(sigmas[step]), float(sigmas[step + 1]))
        if preview is not None:
            preview(step, latents)
    pixels = decode_latents(pipe.vae, unpack_latents(latents, request.height, request.width))
    return tensor_to_images(pixels)[0]


class Editor:
    """A loaded pipeline plus the inference path: what the CLI, validation and Serve hold."""

    def __init__(self, pipe):
        self.pipe = pipe

    def edit(self, reference: Image.Image, request: EditRequest, preview=None) -> Image.Image:
        return edit_image(self.pipe, reference, request, preview)


def load_editor(name_or_path: str, device: str | None = None) -> Editor:
    return Editor(load_pipeline(name_or_path, device=device))

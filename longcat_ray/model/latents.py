"""VAE latents: image preprocessing, encoding, normalisation and the 2x2 packing the DiT consumes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# The VAE halves the spatial size 3 times (8x) and the DiT packs 2x2 latent patches: pixels per token side.
VAE_SCALE = 8
PIXELS_PER_TOKEN = VAE_SCALE * 2


def image_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[n] RGB PIL images of one size -> [n, 3, h, w] float32 in [-1, 1]."""
    return pixels_to_tensor(torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])))


def pixels_to_tensor(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [n, h, w, 3] (on any device) -> float32 [n, 3, h, w] in [-1, 1], as diffusers' preprocess."""
    return (pixels.float() / 255.0).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[n, 3, h, w] in [-1, 1] -> [n] PIL images (rounded as diffusers' postprocess does)."""
    arrays = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]


def normalize_latents(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Raw VAE latents -> the DiT's latent space: (z - shift) * scale."""
    return (latents - shift) * scale


def denormalize_latents(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """The DiT's latent space -> raw VAE latents: z / scale + shift."""
    return latents / scale + shift


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[b, 3, h, w] in [-1, 1] -> normalised latents [b, 16, h/8, w/8] (distribution mode, as the pipeline)."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    return normalize_latents(latents, vae.config.shift_factor, vae.config.scaling_factor)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [b, 16, h/8, w/8] -> pixels [b, 3, h, w] in [-1, 1]."""
    raw = denormalize_latents(latents, vae.config.shift_factor, vae.config.scaling_factor)
    return vae.decode(raw.to(vae.dtype), return_dict=False)[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> [b, (h/2)(w/2), 4c]: each 2x2 latent patch becomes one token."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[b, (h/16)(w/16), 4c] -> [b, c, h/8, w/8] for an image of height x width pixels."""
    b, _, channels = tokens.shape
    rows, cols = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    patches = tokens.view(b, rows, cols, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, rows * 2, cols * 2)

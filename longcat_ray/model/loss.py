"""The training objective, exactly as the official LongCat edit trainer (DESIGN.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_ray.model import flow
from longcat_ray.model.latents import pack_latents


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor -> `device` without making the host wait for the GPU (pinned, non-blocking copy); the
    cast runs on the device."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)


def choose_prompts(text: torch.Tensor, blank: torch.Tensor | None, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Caption dropout: each sample's embedding swapped for ("", same reference) with probability `dropout`."""
    if blank is None or dropout <= 0:
        return text
    drop = (torch.rand(text.shape[0], generator=generator) < dropout).tolist()  # [b]
    return torch.stack([b if d else t for t, b, d in zip(text, blank, drop)])  # a row pick, not a where over both


def draw_step(edit_shape: torch.Size, text_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The host-side inputs of one training step besides the data: sigmas [b] = shift(sigmoid(N(0,1))) with the
    shift of this resolution, noise [b, n, 4c] (float32) for the packed edit latents, and the position ids. Drawn
    from `generator` in this order, so the same numbers on any device; a background thread can make them ahead."""
    b, c, h, w = edit_shape
    tokens = (h // 2) * (w // 2)
    sigmas = flow.sample_sigmas(b, flow.shift_mu(tokens), generator)  # [b]
    noise = torch.randn((b, tokens, c * 4), generator=generator, dtype=torch.float32)
    txt_ids, img_ids = flow.edit_position_ids(text_len, h // 2, w // 2)
    return {"sigmas": sigmas, "noise": noise, "txt_ids": txt_ids, "img_ids": img_ids}


def flow_matching_loss(
    transformer,
    edit_latents: torch.Tensor,
    ref_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    draws: torch.Generator | dict[str, torch.Tensor],
) -> torch.Tensor:
    """MSE between the DiT's velocity and eps - x0 on the edit latents, given the clean reference.

    edit/ref latents [b, 16, h/8, w/8] (one bucket), prompt_embeds [b, L, d]; `draws`: `draw_step`'s output (or a dict
    holding its keys), or the host generator to draw it from. The reference tokens ride along at the same timestep. Host draws reach the
    device without a host-device sync.
    """
    if isinstance(draws, torch.Generator):
        draws = draw_step(edit_latents.shape, prompt_embeds.shape[1], draws)
    device = edit_latents.device
    clean, reference = pack_latents(edit_latents), pack_latents(ref_latents)  # [b, n, 64]
    sigmas = to_device(draws["sigmas"], device)  # [b]
    noise = to_device(draws["noise"], device, clean.dtype)  # [b, n, 64]
    noisy = flow.noise_latents(clean, noise, sigmas)
    txt_ids, img_ids = to_device(draws["txt_ids"], device), to_device(draws["img_ids"], device)
    velocity = flow.predict_velocity(transformer, noisy, reference, prompt_embeds, txt_ids, img_ids, sigmas)
    return F.mse_loss(velocity.float(), flow.flow_target(clean, noise).float())

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


def flow_matching_loss(
    transformer,
    edit_latents: torch.Tensor,
    ref_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """MSE between the DiT's velocity and eps - x0 on the edit latents, given the clean reference.

    edit/ref latents [b, 16, h/8, w/8] (one bucket), prompt_embeds [b, L, d]. sigma = shift(sigmoid(N(0,1)))
    with the shift of this resolution; the reference tokens ride along at the same timestep. The noise and
    sigmas come from the host `generator` (the same numbers on any device) and reach the device without a
    host-device sync.
    """
    b, _, h, w = edit_latents.shape
    device = edit_latents.device
    clean, reference = pack_latents(edit_latents), pack_latents(ref_latents)  # [b, n, 64]
    sigmas = to_device(flow.sample_sigmas(b, flow.shift_mu(clean.shape[1]), generator), device)  # [b]
    noise = to_device(torch.randn(clean.shape, generator=generator, dtype=torch.float32), device, clean.dtype)
    noisy = flow.noise_latents(clean, noise, sigmas)
    txt_ids, img_ids = (to_device(ids, device) for ids in flow.edit_position_ids(prompt_embeds.shape[1], h // 2, w // 2))
    velocity = flow.predict_velocity(transformer, noisy, reference, prompt_embeds, txt_ids, img_ids, sigmas)
    return F.mse_loss(velocity.float(), flow.flow_target(clean, noise).float())

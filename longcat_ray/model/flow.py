"""Flow matching for LongCat-Image-Edit: position ids, sigma schedules and shift, noising, target.

Pure tensor functions; training and inference both build their inputs here, so the model is
conditioned identically in both.
"""

from __future__ import annotations

import math

import torch

# Modality ids on the first rotary axis (diffusers' prepare_pos_ids callers).
TEXT_MODALITY, TARGET_MODALITY, REFERENCE_MODALITY = 0, 1, 2
# Dynamic-shift line of the real scheduler config: mu = 0.5 at 256 target tokens, 1.15 at 4096.
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def text_position_ids(length: int) -> torch.Tensor:
    """-> [length, 3]: (modality 0, i, i) for each text token i."""
    ids = torch.zeros(length, 3)
    ids[:, 1] = torch.arange(length)
    ids[:, 2] = torch.arange(length)
    return ids


def image_position_ids(modality: int, rows: int, cols: int, offset: int) -> torch.Tensor:
    """-> [rows*cols, 3]: (modality, row + offset, col + offset) for each packed latent token."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = modality
    ids[..., 1] = torch.arange(rows)[:, None] + offset
    ids[..., 2] = torch.arange(cols)[None, :] + offset
    return ids.reshape(rows * cols, 3)


def edit_position_ids(text_len: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (txt_ids [text_len, 3], img_ids [2*rows*cols, 3]) for the sequence [target; reference].

    Target and reference share one grid, offset by the text length; only the modality id differs.
    """
    target = image_position_ids(TARGET_MODALITY, rows, cols, text_len)
    reference = image_position_ids(REFERENCE_MODALITY, rows, cols, text_len)
    return text_position_ids(text_len), torch.cat([target, reference], dim=0)


def shift_mu(target_tokens: int) -> float:
    """Resolution-dependent shift: linear in the target's packed token count."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return target_tokens * slope + (BASE_SHIFT - slope * BASE_SEQ_LEN)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Exponential time shift: pushes sigmas toward 1 (more noise) as mu grows."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def inference_sigmas(steps: int, mu: float) -> torch.Tensor:
    """-> [steps + 1]: shifted linspace(1, 1/steps) followed by the terminal 0."""
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return torch.cat([time_shift(mu, base), torch.zeros(1, dtype=torch.float64)]).float()


def sample_sigmas(batch: int, mu: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """-> [batch]: training sigmas, sigmoid of a standard normal, then shifted like inference."""
    logits = torch.randn(batch, generator=generator)
    return time_shift(mu, torch.sigmoid(logits))


def noise_latents(clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma * eps; clean/noise [b, n, d], sigmas [b]."""
    s = sigmas.view(-1, *([1] * (clean.dim() - 1))).to(clean.dtype)
    return (1 - s) * clean + s * noise


def flow_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the DiT predicts: eps - x_0."""
    return noise - clean


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE from sigma to sigma_next (computed in float32, as the scheduler)."""
    stepped = latents.float() + (sigma_next - sigma) * velocity.float()
    return stepped.to(latents.dtype)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: u + g (c - u)."""
    return uncond + scale * (cond - uncond)


def predict_velocity(
    transformer,
    noisy: torch.Tensor,
    reference: torch.Tensor,
    prompt_embeds: torch.Tensor,
    txt_ids: torch.Tensor,
    img_ids: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """One DiT forward on [noisy target; reference] -> velocity of the target tokens.

    noisy/reference [b, n, 64], prompt_embeds [b, L, d], sigmas [b] -> [b, n, 64]. The reference tokens
    get the same timestep as the target (as inference does), not SimpleTuner's t=0.
    """
    hidden = torch.cat([noisy, reference], dim=1)
    out = transformer(
        hidden_states=hidden,
        encoder_hidden_states=prompt_embeds,
        timestep=sigmas.to(device=hidden.device, dtype=hidden.dtype),
        txt_ids=txt_ids.to(hidden.device),
        img_ids=img_ids.to(hidden.device),
        return_dict=False,
    )[0]
    return out[:, : noisy.shape[1]]

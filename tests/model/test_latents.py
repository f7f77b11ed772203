"""VAE latents and packing against diffusers' LongCatImageEditPipeline on the tiny model."""

import torch

from longcat_ray.model.latents import (
    denormalize_latents,
    encode_latents,
    image_to_tensor,
    normalize_latents,
    pack_latents,
    unpack_latents,
)
from tests.conftest import reference_image


def test_pack_matches_pipeline_and_roundtrips(tiny_pipe):
    latents = torch.randn(2, 16, 12, 8)  # a 96x64-px image
    packed = pack_latents(latents)
    assert packed.shape == (2, 6 * 4, 64)
    assert torch.equal(packed, tiny_pipe._pack_latents(latents, 2, 16, 12, 8))
    assert torch.equal(unpack_latents(packed, 96, 64), latents)
    assert torch.equal(unpack_latents(packed, 96, 64), tiny_pipe._unpack_latents(packed, 96, 64, 8))


def test_pack_is_sensitive_to_axis_order():
    latents = torch.randn(1, 16, 4, 6)
    wrong = latents.view(1, 16, 2, 2, 3, 2).permute(0, 2, 4, 1, 5, 3).reshape(1, 6, 64)  # swapped patch axes
    assert not torch.equal(pack_latents(latents), wrong)


def test_encode_latents_matches_pipeline(tiny, tiny_pipe):
    pixels = image_to_tensor([reference_image(tiny).resize((64, 96))])
    ours = encode_latents(tiny_pipe.vae, pixels)
    theirs = tiny_pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(ours, theirs)
    # The inverse transform (SimpleTuner's validation bug) is not the same thing.
    raw = tiny_pipe.vae.encode(pixels).latent_dist.mode()
    cfg = tiny_pipe.vae.config
    assert not torch.allclose(ours, raw * cfg.scaling_factor + cfg.shift_factor)
    torch.testing.assert_close(denormalize_latents(ours, cfg.shift_factor, cfg.scaling_factor), raw)
    torch.testing.assert_close(normalize_latents(raw, cfg.shift_factor, cfg.scaling_factor), ours)


def test_image_to_tensor_matches_pipeline_preprocess(tiny, tiny_pipe):
    image = reference_image(tiny).resize((64, 96))
    torch.testing.assert_close(image_to_tensor([image]), tiny_pipe.image_processor.preprocess(image, 96, 64))

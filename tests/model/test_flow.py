"""Position ids, sigma schedules and the flow-matching identities against diffusers."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_shift, prepare_pos_ids

from longcat_ray.model import flow


def test_position_ids_match_pipeline(tiny_pipe):
    text_len, rows, cols = 7, 3, 5
    txt_ids, img_ids = flow.edit_position_ids(text_len, rows, cols)
    latents = torch.zeros(1, 16, rows * 2, cols * 2)
    _, _, target_ids, ref_ids = tiny_pipe.prepare_latents(
        latents, 1, 16, rows * 16, cols * 16, torch.float32, text_len, "cpu", None
    )
    torch.testing.assert_close(img_ids, torch.cat([target_ids, ref_ids]).float())
    torch.testing.assert_close(txt_ids, prepare_pos_ids(modality_id=0, type="text", num_token=text_len))
    # modality is the only difference between target and reference ids
    assert torch.equal(img_ids[: rows * cols, 1:], img_ids[rows * cols :, 1:])
    assert set(img_ids[: rows * cols, 0].tolist()) == {1.0} and set(img_ids[rows * cols :, 0].tolist()) == {2.0}


@pytest.mark.parametrize("tokens", [16, 256, 2304, 4096, 6000])
def test_shift_mu_matches_pipeline(tokens):
    assert flow.shift_mu(tokens) == pytest.approx(calculate_shift(tokens))


@pytest.mark.parametrize("steps,tokens", [(1, 64), (4, 64), (40, 2304)])
def test_inference_sigmas_match_scheduler(tiny_pipe, steps, tokens):
    mu = flow.shift_mu(tokens)
    scheduler = tiny_pipe.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu)
    torch.testing.assert_close(flow.inference_sigmas(steps, mu), scheduler.sigmas.float())
    unshifted = torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)])
    if steps > 1:
        assert not torch.allclose(unshifted, scheduler.sigmas.float())


def test_sample_sigmas_follow_shifted_sigmoid_normal():
    generator = torch.Generator().manual_seed(0)
    mu = flow.shift_mu(2304)
    sigmas = flow.sample_sigmas(20000, mu, generator)
    assert sigmas.min() > 0 and sigmas.max() < 1
    # median of sigmoid(N(0,1)) is 0.5; the shift moves it to e^mu / (e^mu + 1)
    assert sigmas.median().item() == pytest.approx(np.exp(mu) / (np.exp(mu) + 1), abs=0.01)


def test_noising_target_and_euler_step_are_consistent():
    clean, noise = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    sigmas = torch.tensor([0.3, 0.9])
    noisy = flow.noise_latents(clean, noise, sigmas)
    torch.testing.assert_close(flow.noise_latents(clean, noise, torch.zeros(2)), clean)
    torch.testing.assert_close(flow.noise_latents(clean, noise, torch.ones(2)), noise)
    target = flow.flow_target(clean, noise)
    # one Euler step with the exact velocity from any sigma lands on the clean sample: training's target is
    # the velocity inference integrates
    for i in range(2):
        landed = flow.euler_step(noisy[i : i + 1], target[i : i + 1], float(sigmas[i]), 0.0)
        torch.testing.assert_close(landed, clean[i : i + 1])


def test_euler_step_matches_scheduler(tiny_pipe):
    scheduler = tiny_pipe.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.7)
    sample, velocity = torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    theirs = scheduler.step(velocity, scheduler.timesteps[1], sample, return_dict=False)[0]
    ours = flow.euler_step(sample, velocity, float(scheduler.sigmas[1]), float(scheduler.sigmas[2]))
    torch.testing.assert_close(ours, theirs)


def test_guide():
    cond, uncond = torch.ones(3), torch.zeros(3)
    torch.testing.assert_close(flow.guide(cond, uncond, 4.5), torch.full((3,), 4.5))

"""DeepFloyd IF's sampler (ancestral DDPM, learned-range variance, dynamic thresholding) against diffusers'
DDPMScheduler configured as IF's: the same model outputs and the same step noise give the same samples."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from gm.modules.diffusionmodules.ddpm_sampling import dynamic_threshold, leading_timesteps, sample_ddpm
from gm.modules.diffusionmodules.discretizer import CosineDDPMDiscretization


def if_scheduler(sample_max_value: float) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                         thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=sample_max_value,
                         clip_sample=True, prediction_type="epsilon")


def fake_unet(x: np.ndarray, t: int):
    """A deterministic stand-in for the UNet: eps and a variance fraction v in (-1, 1) depending on x and t."""
    return np.tanh(0.7 * x + t / 1000.0).astype(np.float32), np.sin(3.0 * x).astype(np.float32)


def test_cosine_schedule_equals_squaredcos_cap_v2():
    expected = if_scheduler(1.5).alphas_cumprod.numpy()
    np.testing.assert_allclose(CosineDDPMDiscretization().alphas_cumprod, expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 27, 100])
def test_leading_timesteps_equal_diffusers(steps):
    scheduler = if_scheduler(1.5)
    scheduler.set_timesteps(steps)
    np.testing.assert_array_equal(leading_timesteps(steps, 1000), scheduler.timesteps.numpy())


def test_dynamic_threshold_equals_diffusers():
    rng = np.random.default_rng(0)
    x0 = (rng.standard_normal((3, 3, 8, 8)) * np.array([0.3, 1.2, 4.0])[:, None, None, None]).astype(np.float32)
    expected = if_scheduler(1.5)._threshold_sample(torch.tensor(x0)).numpy()
    np.testing.assert_allclose(dynamic_threshold(x0, 0.95, 1.5), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sample_max_value", [1.5, 1.0])
def test_sampling_equals_diffusers_step_by_step(sample_max_value):
    steps, shape = 20, (2, 3, 8, 8)
    scheduler = if_scheduler(sample_max_value)
    scheduler.set_timesteps(steps)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected, reference_noise = x0.clone(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        eps, v = fake_unet(expected.numpy(), int(t))
        output = torch.cat([torch.tensor(eps), torch.tensor(v)], dim=1)
        expected = scheduler.step(output, t, expected, generator=reference_noise).prev_sample
    noise = torch.Generator().manual_seed(1)  # drawn in the reference's order and shape
    got = sample_ddpm(fake_unet, x0.numpy(), leading_timesteps(steps, 1000), CosineDDPMDiscretization().alphas_cumprod,
                      threshold=lambda x: dynamic_threshold(x, 0.95, sample_max_value),
                      noise_fn=lambda x: torch.randn(x.shape, generator=noise).numpy())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_ancestral_sampling_without_noise_fn_is_a_clear_error():
    with pytest.raises(ValueError, match="pass noise_fn"):
        sample_ddpm(fake_unet, np.zeros((1, 3, 4, 4), np.float32), [500, 0], CosineDDPMDiscretization().alphas_cumprod)

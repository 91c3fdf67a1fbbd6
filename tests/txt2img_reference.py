"""What a diffusers text-to-image reference needs to run MindBooth's deterministic Euler sampling: the same schedule,
the same start, the same callback view of the latents, and the image comparison. Shared by tests/test_txt2img_parity.py
(SDXL) and tests/test_family_parity.py (SD 1.5, SD 2.1 v, SSD-1B)."""
import math

import numpy as np
import torch

from gm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization

SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def euler_scheduler(prediction_type="epsilon"):
    """diffusers' Euler on sgm's LegacyDDPM schedule: "trailing" spacing gives sgm's timesteps (checked in
    tests/test_txt2img_parity.py). `prediction_type`: epsilon (EpsScaling) or v_prediction (VScaling)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULE, prediction_type=prediction_type, timestep_spacing="trailing")


def diffusers_start_latents(noise: np.ndarray, steps: int) -> torch.Tensor:
    """Our sampler starts at noise * sqrt(1 + sigma_0^2) (sgm); diffusers' Euler with "trailing" spacing multiplies the
    given latents by init_noise_sigma = sigma_0 only: the latents to hand it so that both start at the same point."""
    sigma_0 = float(LegacyDDPMDiscretization()(steps)[0])
    scheduler = euler_scheduler()
    scheduler.set_timesteps(steps)
    return torch.from_numpy(noise) * (math.sqrt(1.0 + sigma_0**2) / float(scheduler.init_noise_sigma))


def run_reference(pipe, steps: int, **call):
    """The pipeline's uint8 image (1, H, W, 3), as our to_uint8 rounds, and its latents after every step."""
    latents = []

    def record(pipeline, i, t, kwargs):
        latents.append(kwargs["latents"].numpy().copy())  # x after step i
        return {}

    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(num_inference_steps=steps, output_type="np", callback_on_step_end=record, **call).images
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), latents


def step_errors(ours, reference) -> list:
    """Relative error (max |a - b| / max |b|) of the latents after each step."""
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, reference)]


def assert_images_match(ours, reference, label=""):
    """<= 3/255 at any pixel, <= 0.5/255 on average, on an image that is not flat."""
    assert ours.shape == reference.shape and ours.dtype == reference.dtype == np.uint8
    diff = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
    print(f"{label}: image max {diff.max()}/255, mean {diff.mean():.4f}/255, image std {reference.std():.1f}")
    assert reference.std() > 10  # not a flat image: the comparison means something
    assert diff.max() <= 3, f"max abs difference {diff.max()}/255"
    assert diff.mean() <= 0.5, f"mean abs difference {diff.mean():.3f}/255"

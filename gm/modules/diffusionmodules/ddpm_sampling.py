"""Discrete-time ancestral DDPM sampling, as DeepFloyd IF samples (diffusers' DDPMScheduler with learned-range
variance and dynamic thresholding).

Unlike sampling.py (continuous sigmas, x_0 + sigma * noise), these work on the variance-preserving chain
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at integer training timesteps:

    model(x, t: int) -> (eps, v)     the predicted noise (guidance already applied) and the variance
                                     interpolation v in [-1, 1] of the model's second output half
    x                                the starting sample, pure noise at timesteps[0]
    timesteps                        descending training timesteps, e.g. leading_timesteps(100, 1000)
    alphas_cumprod                   abar_t of the training schedule, length num_train_timesteps

x is a numpy array: dynamic thresholding needs a per-sample quantile. Randomness comes from
`noise_fn(x) -> standard normal like x`; `callback({"i", "total", "t", "x", "denoised"})` after every step.
"""
import numpy as np

from gm.modules.diffusionmodules.discretizer import CosineDDPMDiscretization
from gm.util import instantiate_from_config


def leading_timesteps(num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """diffusers' default "leading" spacing: 0, r, 2r, ... (r = num_train_timesteps // num_steps), largest first."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio)[::-1].astype(np.int64)


def dynamic_threshold(x0, ratio: float = 0.95, max_value: float = 1.5):
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): s = the `ratio` quantile of |x0| per sample,
    clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1.0, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def sample_ddpm(model, x, timesteps, alphas_cumprod, threshold=None, noise_fn=None, callback=None):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) from the posterior q(x_prev | x_t, x_0) with x_0 predicted
    from eps (then thresholded), and the learned-range variance of Improved DDPM (Nichol & Dhariwal 2021, eq. 15):
    log sigma^2 = (v+1)/2 log beta_t + (1 - (v+1)/2) log beta~_t, where beta~_t is the posterior variance."""
    timesteps = [int(t) for t in timesteps]
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < total else -1
        abar, abar_prev = float(alphas_cumprod[t]), float(alphas_cumprod[prev]) if prev >= 0 else 1.0
        beta = 1.0 - abar / abar_prev
        eps, v = model(x, t)
        denoised = (x - (1.0 - abar) ** 0.5 * eps) / abar**0.5
        if threshold is not None:
            denoised = threshold(denoised)
        x = (abar_prev**0.5 * beta / (1.0 - abar)) * denoised + ((1.0 - beta) ** 0.5 * (1.0 - abar_prev) / (1.0 - abar)) * x
        if t > 0:
            if noise_fn is None:
                raise ValueError("ancestral sampling adds noise: pass noise_fn(x) -> standard normal like x")
            posterior_log_var = np.log(max((1.0 - abar_prev) / (1.0 - abar) * beta, 1e-20))
            frac = (v + 1.0) / 2.0
            log_var = frac * np.log(beta) + (1.0 - frac) * posterior_log_var
            x = x + np.exp(0.5 * log_var) * noise_fn(x)
        x = x.astype(np.float32)
        if callback is not None:
            callback({"i": i, "total": total, "t": t, "x": x, "denoised": denoised})
    return x


class DDPMSampler:
    """The `sampler_config` of DeepFloyd IF's engines: IF's DDPMScheduler settings (cosine schedule, learned-range
    variance, dynamic thresholding) and classifier-free guidance as diffusers' IF pipelines apply it.

    `noise_level`: stage II only, the timestep at which the upscaled low-resolution image is noised
    (`add_noise`, diffusers' image_noising_scheduler, same cosine schedule) and told to the UNet as class_labels."""

    def __init__(self, num_steps: int = 100, guidance_scale: float = 7.0, dynamic_thresholding_ratio: float = 0.95,
                 sample_max_value: float = 1.5, noise_level: int = None, discretization_config=None):
        self.discretization = (CosineDDPMDiscretization() if discretization_config is None
                               else instantiate_from_config(discretization_config))
        self.num_steps, self.guidance_scale = int(num_steps), float(guidance_scale)
        self.dynamic_thresholding_ratio, self.sample_max_value = float(dynamic_thresholding_ratio), float(sample_max_value)
        num_train = self.discretization.num_timesteps
        if noise_level is not None and not 0 <= int(noise_level) < num_train:
            raise ValueError(f"noise_level must be a timestep in [0, {num_train}), got {noise_level}")
        self.noise_level = None if noise_level is None else int(noise_level)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.discretization.alphas_cumprod

    def threshold(self, x0):
        return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)

    def add_noise(self, x, noise, t: int):
        """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise (diffusers' DDPMScheduler.add_noise)."""
        abar = float(self.alphas_cumprod[int(t)])
        return (abar**0.5 * x + (1.0 - abar) ** 0.5 * noise).astype(np.float32)

    def __call__(self, network, x, noise_fn, num_steps: int = None, guidance_scale: float = None, callback=None):
        """network(x_in, t) -> the UNet's numpy output (N, 2C, H, W) for x_in (N, C, H, W): with guidance
        (scale > 1) x_in is x twice, negative prompt first, and eps = eps_neg + scale (eps_pos - eps_neg) with the
        positive prompt's variance half, as diffusers' IF pipelines do."""
        num_steps = self.num_steps if num_steps is None else int(num_steps)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        channels = x.shape[1]

        def model(x, t):
            if scale > 1.0:
                negative, positive = np.split(network(np.concatenate([x, x]), t), 2)
                eps = negative[:, :channels] + scale * (positive[:, :channels] - negative[:, :channels])
                return eps, positive[:, channels:]
            out = network(x, t)
            return out[:, :channels], out[:, channels:]

        timesteps = leading_timesteps(num_steps, self.discretization.num_timesteps)
        return sample_ddpm(model, x, timesteps, self.alphas_cumprod, self.threshold, noise_fn, callback)

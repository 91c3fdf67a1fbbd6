"""Sampler objects built from config (sgm's diffusionmodules/sampling.py classes): a schedule
(discretization), a guider, and one of the step rules in `sampling.py`.

    sampler(denoiser_fn, x_noise, cond, uc) -> latents

`denoiser_fn(x, sigma, cond) -> denoised` with sigma a (B,) Tensor (the DiffusionEngine passes
`lambda x, s, c: denoiser(unet, x, s, c)`); `x_noise` is standard-normal noise, which the sampler
scales to the first noise level as sgm does: x = x_noise * sqrt(1 + sigma_0^2).
"""
import math

import mindspore as ms
import numpy as np

from gm.modules.diffusionmodules import sampling
from gm.util import default, instantiate_from_config

IDENTITY_GUIDER = {"target": "gm.modules.diffusionmodules.guiders.IdentityGuider"}


def sigmas_for_img2img(sigmas, strength: float) -> np.ndarray:
    """The tail of a descending schedule (ending in 0) for img2img at `strength` in (0, 1]: the
    max(int(strength * len(sigmas)), 1) smallest sigmas, as sgm's Img2ImgDiscretizationWrapper.
    strength 1 keeps the whole schedule; near 0 only [0] remains (the input comes back unchanged)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"img2img strength must be in (0, 1], got {strength}")
    sigmas = np.asarray(sigmas)
    keep = max(int(strength * len(sigmas)), 1)
    return sigmas[len(sigmas) - keep:]


def rng_noise_fn(rng: np.random.Generator):
    """noise_fn for the stochastic samplers: standard normal like x, drawn on the host from `rng`."""
    def noise_fn(x):
        noise = rng.standard_normal(tuple(x.shape)).astype(np.float32)
        return ms.Tensor(noise).astype(x.dtype) if isinstance(x, ms.Tensor) else noise.astype(x.dtype)
    return noise_fn


class BaseDiffusionSampler:
    def __init__(self, discretization_config, num_steps=None, guider_config=None):
        self.num_steps = num_steps
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(default(guider_config, IDENTITY_GUIDER))

    def get_sigmas(self, num_steps=None, strength: float = 1.0) -> np.ndarray:
        """Descending float32 schedule ending in 0 (cut for img2img when strength < 1)."""
        num_steps = default(num_steps, self.num_steps)
        if num_steps is None:
            raise ValueError("no number of sampling steps: set num_steps in the sampler config or pass num_steps")
        sigmas = self.discretization(num_steps)
        return sigmas if strength == 1.0 else sigmas_for_img2img(sigmas, strength)

    def make_denoise(self, denoiser_fn, cond: dict, uc: dict = None):
        """(x, sigma: float) -> guided denoised latent, the callable the step functions use."""
        uc = default(uc, cond)

        def denoise(x, sigma):
            s = ms.Tensor(np.full((x.shape[0],), sigma, dtype=np.float32))
            x_in, s_in, cond_in = self.guider.prepare_inputs(x, s, cond, uc)
            return self.guider(denoiser_fn(x_in, s_in, cond_in), s_in)
        return denoise

    def sample(self, denoise, x, sigmas, callback, noise_fn):
        raise NotImplementedError

    def __call__(self, denoiser_fn, x_noise, cond, uc=None, num_steps=None, callback=None,
                 init_latents=None, strength: float = 1.0, rng: np.random.Generator = None):
        """Text-to-image from x_noise, or img2img from `init_latents` noised with x_noise to the
        sigma where a `strength` schedule starts. `rng` feeds the per-step noise of stochastic
        samplers (default: np.random.default_rng(0), so a call is reproducible)."""
        if not isinstance(x_noise, ms.Tensor):
            x_noise = ms.Tensor(np.asarray(x_noise, dtype=np.float32))
        if init_latents is None:
            if strength != 1.0:
                raise ValueError("strength < 1 is img2img: pass init_latents too")
            sigmas = self.get_sigmas(num_steps)
            x = x_noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
        else:
            if not isinstance(init_latents, ms.Tensor):
                init_latents = ms.Tensor(np.asarray(init_latents, dtype=np.float32))
            sigmas = self.get_sigmas(num_steps, strength)
            x = init_latents + x_noise * float(sigmas[0])
        noise_fn = rng_noise_fn(rng if rng is not None else np.random.default_rng(0))
        return self.sample(self.make_denoise(denoiser_fn, cond, uc), x, sigmas, callback, noise_fn)


class EDMSampler(BaseDiffusionSampler):
    """Shared EDM options: churn s_churn (0 = deterministic) between s_tmin and s_tmax, noise scale s_noise."""

    def __init__(self, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)

    def churn_options(self):
        return dict(s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax, s_noise=self.s_noise)


class EulerEDMSampler(EDMSampler):
    def sample(self, denoise, x, sigmas, callback, noise_fn):
        return sampling.sample_euler(denoise, x, sigmas, noise_fn=noise_fn, callback=callback, **self.churn_options())


class HeunEDMSampler(EDMSampler):
    def sample(self, denoise, x, sigmas, callback, noise_fn):
        return sampling.sample_heun(denoise, x, sigmas, noise_fn=noise_fn, callback=callback, **self.churn_options())


class EulerAncestralSampler(BaseDiffusionSampler):
    def __init__(self, eta=1.0, s_noise=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta, self.s_noise = float(eta), float(s_noise)

    def sample(self, denoise, x, sigmas, callback, noise_fn):
        return sampling.sample_euler_ancestral(denoise, x, sigmas, eta=self.eta, s_noise=self.s_noise,
                                               noise_fn=noise_fn, callback=callback)


class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM++ 2M; with discretization KarrasDiscretization it is "DPM++ 2M Karras"."""

    def sample(self, denoise, x, sigmas, callback, noise_fn):
        return sampling.sample_dpmpp_2m(denoise, x, sigmas, callback=callback)

"""Noise-level (sigma) schedules, as in sgm's diffusionmodules/discretizer.py.

A discretization maps a step count `n` to `n` noise levels sigma, largest first, optionally with a
trailing 0 (the clean sample). The tables are host-side numpy: they are constants of the model,
computed once in float64 and handed out as float32.
"""
import numpy as np


def generate_roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """sgm's timestep choice for `num_substeps` of `max_step` training steps, ascending.

    For step counts that divide `max_step` this equals diffusers' "trailing" spacing (999, 974, ...).
    """
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization:
    """Base: `__call__(n)` -> float32 sigmas, descending, with 0 appended unless told not to."""

    def get_sigmas(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, n: int, do_append_zero: bool = True, flip: bool = False) -> np.ndarray:
        n = int(n)
        if n < 1:
            raise ValueError(f"number of sigmas must be at least 1, got {n}")
        sigmas = np.asarray(self.get_sigmas(n), dtype=np.float64)
        if do_append_zero:
            sigmas = np.append(sigmas, 0.0)
        if flip:
            sigmas = sigmas[::-1]
        return np.ascontiguousarray(sigmas, dtype=np.float32)


class LegacyDDPMDiscretization(Discretization):
    """The DDPM schedule SD/SDXL were trained with: betas linear in sqrt space ("scaled_linear"),
    sigma_t = sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t)."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000):
        self.num_timesteps = int(num_timesteps)
        self.betas = np.linspace(linear_start**0.5, linear_end**0.5, self.num_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)

    def timesteps(self, n: int) -> np.ndarray:
        """The training timesteps (ascending) whose sigmas `__call__(n)` returns."""
        if n > self.num_timesteps:
            raise ValueError(f"asked for {n} sampling steps but the model has only {self.num_timesteps} noise levels; use at most {self.num_timesteps}")
        if n == self.num_timesteps:
            return np.arange(self.num_timesteps)
        return generate_roughly_equally_spaced_steps(n, self.num_timesteps)

    def get_sigmas(self, n: int) -> np.ndarray:
        alphas_cumprod = self.alphas_cumprod[self.timesteps(n)]
        sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        return sigmas[::-1]


class CosineDDPMDiscretization(LegacyDDPMDiscretization):
    """The cosine schedule of Improved DDPM (Nichol & Dhariwal 2021, eq. 17; diffusers' "squaredcos_cap_v2"), which
    DeepFloyd IF was trained with: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, each beta capped at 0.999."""

    def __init__(self, num_timesteps: int = 1000, max_beta: float = 0.999):
        self.num_timesteps = int(num_timesteps)
        edges = np.arange(self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
        alpha_bar = np.cos((edges + 0.008) / 1.008 * np.pi / 2) ** 2
        self.betas = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)


class KarrasDiscretization(Discretization):
    """Karras et al. (2022) schedule: sigmas evenly spaced in sigma**(1/rho) between sigma_max and
    sigma_min. By default the ends are those of the legacy DDPM table (about 14.61 and 0.0292), so
    every sigma lies inside the range the UNet was trained on (as diffusers' `use_karras_sigmas`)."""

    def __init__(self, sigma_min: float = None, sigma_max: float = None, rho: float = 7.0,
                 linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000):
        table = LegacyDDPMDiscretization(linear_start, linear_end, num_timesteps).get_sigmas(num_timesteps)
        self.sigma_min = float(table.min()) if sigma_min is None else float(sigma_min)
        self.sigma_max = float(table.max()) if sigma_max is None else float(sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        self.rho = float(rho)

    def get_sigmas(self, n: int) -> np.ndarray:
        ramp = np.linspace(0.0, 1.0, n)
        max_inv_rho = self.sigma_max ** (1.0 / self.rho)
        min_inv_rho = self.sigma_min ** (1.0 / self.rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho

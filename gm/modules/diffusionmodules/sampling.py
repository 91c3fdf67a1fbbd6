"""Samplers as short plain functions, in the style of k-diffusion, with sgm's step rules.

Each one integrates the probability-flow ODE (or its SDE) of a variance-exploding diffusion
x_sigma = x_0 + sigma * noise from sigmas[0] down to sigmas[-1] (normally 0):

    denoise(x, sigma: float) -> denoised   the model's estimate of x_0 (guidance already applied)
    x                                       the starting latent, already at noise level sigmas[0]
    sigmas                                  1-D descending noise levels, normally ending in 0

Only `+ - * /` and Python floats touch x, so x may be a MindSpore Tensor or a numpy array.
Randomness comes from `noise_fn(x) -> standard normal like x`, supplied by the caller so runs are
reproducible. `callback({"i", "total", "sigma", "x", "denoised"})` is called after every step.
"""
import math

import numpy as np


def to_d(x, sigma: float, denoised):
    """The ODE's derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0):
    """Split a step sigma_from -> sigma_to into a deterministic step down to sigma_down and fresh
    noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2. eta=0: no noise (plain Euler)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


def _as_floats(sigmas):
    sigmas = [float(s) for s in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if not sigmas:
        raise ValueError("sigmas is empty; give at least the starting noise level")
    if any(a < b for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] < 0:
        raise ValueError(f"sigmas must be non-negative and descending (largest first), got {sigmas[:3]}...{sigmas[-2:]}")
    return sigmas


def _churn_gamma(sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's stochastic churn (sgm's rule): raise sigma by a factor (1 + gamma) inside [s_tmin, s_tmax]."""
    if s_churn > 0 and s_tmin <= sigma <= s_tmax:
        return min(s_churn / num_steps, 2**0.5 - 1)
    return 0.0


def _churn(x, sigma: float, gamma: float, s_noise: float, noise_fn):
    """Add noise to go from sigma up to sigma_hat = sigma * (1 + gamma)."""
    sigma_hat = sigma * (gamma + 1.0)
    if gamma > 0:
        if noise_fn is None:
            raise ValueError("s_churn > 0 adds noise: pass noise_fn(x) -> standard normal like x")
        x = x + noise_fn(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def sample_euler(denoise, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                 noise_fn=None, callback=None):
    """Euler (EDM Algorithm 2 without the correction); deterministic when s_churn = 0."""
    sigmas = _as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        gamma = _churn_gamma(sigmas[i], total, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(x, sigmas[i], gamma, s_noise, noise_fn)
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        if callback is not None:
            callback({"i": i, "total": total, "sigma": sigmas[i], "x": x, "denoised": denoised})
    return x


def sample_heun(denoise, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                noise_fn=None, callback=None):
    """Heun (EDM Algorithm 2): Euler, then a trapezoidal correction with the slope at the new point;
    the last step into sigma = 0 stays Euler (the slope there would divide by zero)."""
    sigmas = _as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        gamma = _churn_gamma(sigmas[i], total, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(x, sigmas[i], gamma, s_noise, noise_fn)
        denoised = denoise(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x_euler = x + d * dt
        if sigmas[i + 1] == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigmas[i + 1], denoise(x_euler, sigmas[i + 1]))
            x = x + (d + d_next) / 2.0 * dt
        if callback is not None:
            callback({"i": i, "total": total, "sigma": sigmas[i], "x": x, "denoised": denoised})
    return x


def sample_euler_ancestral(denoise, x, sigmas, eta=1.0, s_noise=1.0, noise_fn=None, callback=None):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up."""
    sigmas = _as_floats(sigmas)
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and sigma_up > 0:
            if noise_fn is None:
                raise ValueError("ancestral sampling adds noise: pass noise_fn(x) -> standard normal like x")
            x = x + noise_fn(x) * s_noise * sigma_up
        if callback is not None:
            callback({"i": i, "total": total, "sigma": sigmas[i], "x": x, "denoised": denoised})
    return x


def sample_dpmpp_2m(denoise, x, sigmas, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), in log-SNR time t = -log(sigma), h = t_next - t:

        x_next = (sigma_next / sigma) * x - expm1(-h) * D'
        D' = D                                           first step (no history)
        D' = (1 + 1/(2r)) * D - 1/(2r) * D_prev           otherwise, r = h_prev / h
        x_next = D                                       into sigma_next = 0 (the first-order limit)
    """
    sigmas = _as_floats(sigmas)
    total = len(sigmas) - 1
    old_denoised = None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t - (-math.log(sigmas[i - 1]))) / h
                denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (sigma_next / sigma) - denoised_d * math.expm1(-h)
        old_denoised = denoised
        if callback is not None:
            callback({"i": i, "total": total, "sigma": sigma, "x": x, "denoised": denoised})
    return x

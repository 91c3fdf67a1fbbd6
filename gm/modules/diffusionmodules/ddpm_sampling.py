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

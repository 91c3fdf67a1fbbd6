"""The VAE posterior: a diagonal Gaussian whose mean and log-variance are stacked along channels.

The math lives in plain functions so that graph-compiled code (the autoencoder's `encode`) can use it
without building a Python object inside the graph; `DiagonalGaussianDistribution` wraps the same
functions for eager use.
"""
from mindspore import ops

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's clamp, keeps exp() finite


def gaussian_parameters(moments):
    """(B, 2C, h, w) moments -> mean, clamped logvar, std, each (B, C, h, w)."""
    mean, logvar = ops.chunk(moments, 2, axis=1)
    logvar = ops.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
    return mean, logvar, ops.exp(0.5 * logvar)


def gaussian_sample(mean, std, noise=None):
    """mean + std * noise, with standard normal noise drawn when none is given."""
    if noise is None:
        noise = ops.standard_normal(mean.shape).astype(mean.dtype)
    return mean + std * noise


class DiagonalGaussianDistribution:
    def __init__(self, moments, deterministic: bool = False):
        self.mean, self.logvar, self.std = gaussian_parameters(moments)
        self.deterministic = deterministic
        if deterministic:  # a point mass at the mean
            self.std = ops.zeros_like(self.mean)
        self.var = self.std * self.std

    def sample(self, noise=None):
        return gaussian_sample(self.mean, self.std, noise)

    def mode(self):
        return self.mean

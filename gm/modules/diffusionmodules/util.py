"""Small building blocks shared by the UNet and the conditioner (sgm's diffusionmodules/util.py)."""
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops



def timestep_embedding(timesteps, dim: int, max_period: int = 10000):
    """Sinusoidal embedding of (N,) timesteps -> (N, dim), cosine half first (as sgm and diffusers'
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`)."""
    half = dim // 2
    # The frequencies are constants: numpy keeps them out of the graph (mint.arange has no CPU kernel).
    freqs = ms.Tensor(np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)[None])
    args = timesteps.astype(ms.float32).reshape(-1, 1) * freqs
    embedding = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        embedding = ops.cat([embedding, ops.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def zero_module(module: nn.Cell) -> nn.Cell:
    """Zero a module's parameters (output layers start as identity-preserving residuals)."""
    for param in module.get_parameters():
        param.set_data(ops.zeros(param.shape, param.dtype))
    return module


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups, as every SDXL norm layer in the UNet and VAE."""
    return nn.GroupNorm(32, channels, eps=eps)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """A square convolution with a bias and torch's explicit zero padding, as every SDXL convolution."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=padding,
                     has_bias=True)

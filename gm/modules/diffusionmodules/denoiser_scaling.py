"""Preconditioning of the network's input and output for a noise level sigma (sgm's
denoiser_scaling.py): denoised = network(x * c_in, c_noise) * c_out + x * c_skip."""
import mindspore as ms
from mindspore import ops


@ms.jit_class  # callable from inside a GRAPH_MODE Cell
class EpsScaling:
    """The network predicts the noise eps: denoised = x - sigma * eps(x / sqrt(sigma^2 + 1))."""

    def __call__(self, sigma):
        c_skip = ops.ones_like(sigma)
        c_out = -sigma
        c_in = 1.0 / ops.sqrt(sigma**2 + 1.0)
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise


@ms.jit_class
class VScaling:
    """The network predicts v = alpha * eps - sigma_t * x0 (Salimans & Ho 2022, SD 2.x 768-v), written in sigma:
    denoised = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(x / sqrt(sigma^2 + 1))."""

    def __call__(self, sigma):
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = -sigma / ops.sqrt(sigma**2 + 1.0)
        c_in = 1.0 / ops.sqrt(sigma**2 + 1.0)
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise

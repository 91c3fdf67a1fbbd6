"""Denoisers: wrap the UNet into D(x, sigma) = the predicted clean latent (sgm's denoiser.py).

They are Cells without parameters of their own (the network is passed in on each call), so the
GRAPH_MODE training step can call them and the checkpoint names stay those of the network.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.util import append_dims, instantiate_from_config


class Denoiser(nn.Cell):
    """denoised = network(x * c_in, c_noise, cond) * c_out + x * c_skip, with the c's from the scaling."""

    def __init__(self, scaling_config, weighting_config=None):
        super().__init__(auto_prefix=False)
        self.scaling = instantiate_from_config(scaling_config)
        self.weighting = instantiate_from_config(weighting_config) if weighting_config is not None else None

    def possibly_quantize_sigma(self, sigma):
        return sigma

    def possibly_quantize_c_noise(self, c_noise):
        return c_noise

    def w(self, sigma):
        """Loss weight for sigma (only if built with a weighting_config)."""
        if self.weighting is None:
            raise ValueError("this denoiser has no weighting_config; give it one or weight the loss elsewhere")
        return self.weighting(sigma)

    def construct(self, network, noised_input, sigma, cond):
        """network(x, t, cond) -> model output; noised_input (B, C, H, W); sigma (B,) Tensor;
        cond: dict such as {"crossattn": (B, 77, D), "vector": (B, A)}."""
        sigma = self.possibly_quantize_sigma(sigma.astype(ms.float32))
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, noised_input.ndim))
        dtype = noised_input.dtype
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma.shape))
        model_output = network(noised_input * c_in.astype(dtype), c_noise, cond)
        return model_output * c_out.astype(dtype) + noised_input * c_skip.astype(dtype)


class DiscreteDenoiser(Denoiser):
    """A denoiser for a model trained on `num_idx` discrete noise levels: sigma is snapped to the
    nearest trained level, and the network is told that level's index (the DDPM timestep) as c_noise."""

    def __init__(self, num_idx, discretization_config, scaling_config, weighting_config=None,
                 do_append_zero=False, quantize_c_noise=True, flip=True):
        super().__init__(scaling_config, weighting_config)
        self.num_idx = int(num_idx)
        # flip=True: ascending, so index i is the sigma of training timestep i.
        sigmas = instantiate_from_config(discretization_config)(self.num_idx, do_append_zero=do_append_zero, flip=flip)
        self.sigmas = ms.Tensor(sigmas, ms.float32)  # a constant, not a Parameter: no checkpoint entry
        self.quantize_c_noise = quantize_c_noise

    def sigma_to_idx(self, sigma):
        """Index of the nearest table sigma, same shape as sigma (int)."""
        dists = ops.abs(sigma.astype(ms.float32).reshape(1, -1) - self.sigmas.reshape(-1, 1))
        return ops.argmin(dists, axis=0).reshape(sigma.shape)

    def idx_to_sigma(self, idx):
        return self.sigmas[idx]

    def possibly_quantize_sigma(self, sigma):
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise):
        if self.quantize_c_noise:
            return self.sigma_to_idx(c_noise).astype(ms.float32)
        return c_noise

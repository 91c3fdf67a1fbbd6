"""The training loss (sgm's diffusionmodules/loss.py), split so that randomness stays on the host:
`sample_sigmas` / `sample_noise` draw from a numpy Generator, and the Cell itself is a pure
function of its inputs that the GRAPH_MODE training step can call."""
import numpy as np
from mindspore import nn, ops

from gm.modules.diffusionmodules.denoiser_weighting import EpsWeighting, MinSNRWeighting, VWeighting
from gm.util import append_dims, instantiate_from_config


class StandardDiffusionLoss(nn.Cell):
    """Per-sample loss (B,) = mean over non-batch axes of w(sigma) * (D(x0 + sigma*noise, sigma) - x0)^2
    ("l2") or w(sigma) * |D - x0| ("l1"). With EpsScaling and the default EpsWeighting the l2 loss is
    the usual epsilon MSE, mean((eps_pred - noise)^2). `snr_gamma`: Min-SNR-gamma weighting of that eps (or v) MSE."""

    def __init__(self, sigma_sampler_config, loss_weighting_config=None, loss_type="l2", offset_noise_level=0.0,
                 snr_gamma=None):
        super().__init__(auto_prefix=False)
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"loss_type must be 'l2' or 'l1', got {loss_type!r}")
        self.sigma_sampler = instantiate_from_config(sigma_sampler_config)
        self.loss_weighting = (
            instantiate_from_config(loss_weighting_config) if loss_weighting_config is not None else EpsWeighting()
        )
        if snr_gamma is not None:
            if not isinstance(self.loss_weighting, (EpsWeighting, VWeighting)):
                raise ValueError(f"snr_gamma weights the eps or v MSE; this model's loss weighting is "
                                 f"{type(self.loss_weighting).__name__}")
            self.loss_weighting = MinSNRWeighting(snr_gamma)
        self.loss_type = loss_type
        self.use_l1 = loss_type == "l1"
        self.offset_noise_level = float(offset_noise_level)

    # --- host side: the random inputs of one step ---
    def sample_sigmas(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        return self.sigma_sampler(batch_size, rng)

    def sample_noise(self, shape, rng: np.random.Generator) -> np.ndarray:
        """Standard normal noise of `shape`; with offset noise, plus a per-(sample, channel) constant
        offset_noise_level * N(0, 1), as sgm's offset_noise_level."""
        noise = rng.standard_normal(tuple(shape))
        if self.offset_noise_level > 0.0:
            offset = rng.standard_normal(tuple(shape[:2]))
            noise = noise + self.offset_noise_level * offset.reshape(offset.shape + (1,) * (len(shape) - 2))
        return noise.astype(np.float32)

    # --- graph side ---
    def construct(self, network, denoiser, cond, latents, noise, sigmas):
        """latents, noise: (B, C, H, W); sigmas: (B,) -> loss (B,)."""
        sigmas_bc = append_dims(sigmas.astype(latents.dtype), latents.ndim)
        noised_input = latents + noise * sigmas_bc
        denoised = denoiser(network, noised_input, sigmas, cond)
        w = append_dims(self.loss_weighting(sigmas), latents.ndim).astype(latents.dtype)
        if self.use_l1:
            err = ops.abs(denoised - latents)
        else:
            err = (denoised - latents) ** 2
        return (w * err).reshape(latents.shape[0], -1).mean(axis=1)

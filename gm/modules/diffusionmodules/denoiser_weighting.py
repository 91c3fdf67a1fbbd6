"""Per-noise-level loss weights (sgm's denoiser_weighting.py)."""
import mindspore as ms
from mindspore import ops


@ms.jit_class  # callable from inside a GRAPH_MODE Cell
class EpsWeighting:
    """w = sigma^-2: with EpsScaling this turns the loss on denoised latents into the plain
    epsilon-prediction MSE, since denoised - x0 = sigma * (noise - eps_pred)."""

    def __call__(self, sigma):
        return sigma**-2.0


@ms.jit_class
class VWeighting:
    """w = (sigma^2 + 1) / sigma^2: with VScaling this turns the loss on denoised latents into the v-prediction MSE,
    since denoised - x0 = -sigma / sqrt(sigma^2 + 1) * (v_pred - v)."""

    def __call__(self, sigma):
        return (sigma**2 + 1.0) / sigma**2


@ms.jit_class
class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al., ICCV 2023) with SNR = sigma^-2: the eps-prediction MSE weighted by min(SNR, gamma) / SNR,
    or the v-prediction MSE by min(SNR, gamma) / (SNR + 1). On the loss of denoised latents both are
    w = min(SNR, gamma), since denoised - x0 is sigma (eps) or sigma / sqrt(sigma^2 + 1) (v) times the prediction error."""

    def __init__(self, gamma: float):
        if not gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (5.0 is the paper's value), got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, sigma):
        return ops.minimum(sigma**-2.0, self.gamma)

"""Per-noise-level loss weights (sgm's denoiser_weighting.py)."""
import mindspore as ms


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

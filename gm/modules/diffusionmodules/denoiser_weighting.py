"""Per-noise-level loss weights (sgm's denoiser_weighting.py)."""
import mindspore as ms


@ms.jit_class  # callable from inside a GRAPH_MODE Cell
class EpsWeighting:
    """w = sigma^-2: with EpsScaling this turns the loss on denoised latents into the plain
    epsilon-prediction MSE, since denoised - x0 = sigma * (noise - eps_pred)."""

    def __call__(self, sigma):
        return sigma**-2.0

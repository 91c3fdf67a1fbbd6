"""Noise levels drawn for training (sgm's sigma_sampling.py). Host side, from a numpy Generator,
so a run is reproducible from its seed and the graph step gets sigmas as plain inputs."""
import numpy as np

from gm.util import instantiate_from_config


class DiscreteSampling:
    """sigma drawn uniformly from the model's `num_idx` trained noise levels."""

    def __init__(self, discretization_config, num_idx, do_append_zero=False, flip=True):
        self.num_idx = int(num_idx)
        self.sigmas = instantiate_from_config(discretization_config)(self.num_idx, do_append_zero=do_append_zero, flip=flip)

    def idx(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n timestep indices in [0, num_idx)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
        return rng.integers(0, self.num_idx, size=int(n))

    def idx_to_sigma(self, idx) -> np.ndarray:
        return self.sigmas[np.asarray(idx)]

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) float32 sigmas."""
        return self.idx_to_sigma(self.idx(n, rng)).astype(np.float32)

"""A tiny model (any family: SDXL, SSD-1B, SD 1.5, SD 2.1) with random weights for the quick-start and tests: every parameter drawn (none left at
zero, so gradients reach every LoRA layer), reproducible from a seed."""
import numpy as np


def random_weights(engine, seed: int = 0) -> dict:
    """{name: float32 array} for every parameter of `engine`: norms at identity, biases zero,
    embeddings N(0, 0.02), matrices and kernels N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in engine.parameters_and_names():
        shape = tuple(param.shape)
        if name.endswith(".gamma"):
            value = np.ones(shape)
        elif name.endswith((".beta", ".bias", "in_proj_bias")):
            value = np.zeros(shape)
        elif name.endswith("logit_scale"):
            value = np.full(shape, np.log(1 / 0.07))
        elif name.endswith(("embedding_table", "positional_embedding")):
            value = rng.normal(0.0, 0.02, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            value = rng.normal(0.0, fan_in**-0.5, shape)
        weights[name] = value.astype(np.float32)
    return weights

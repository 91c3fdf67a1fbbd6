"""Guidance (sgm's diffusionmodules/guiders.py): how the sampler calls the denoiser on the
conditional and unconditional inputs and combines the two predictions."""
from mindspore import ops

# Conditioning entries that are per-sample and get batched as [uncond; cond].
BATCHED_COND_KEYS = ("crossattn", "vector", "concat")


class VanillaCFG:
    """Classifier-free guidance, D = D_u + scale * (D_c - D_u).

    One denoiser call on a doubled batch, in sgm's order: the first half is the unconditional input,
    the second half the conditional one (x and sigma repeated, each cond entry = concat(uc, c))."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def prepare_inputs(self, x, sigma, cond: dict, uc: dict):
        missing = [k for k in cond if k in BATCHED_COND_KEYS and k not in uc]
        if missing:
            raise KeyError(f"unconditional cond lacks {missing}; give uc the same keys as cond")
        cond_in = {k: (ops.cat((uc[k], v), axis=0) if k in BATCHED_COND_KEYS else v) for k, v in cond.items()}
        return ops.cat((x, x), axis=0), ops.cat((sigma, sigma), axis=0), cond_in

    def __call__(self, denoised, sigma=None):
        half = denoised.shape[0] // 2
        x_u, x_c = denoised[:half], denoised[half:]
        return x_u + (x_c - x_u) * self.scale


class IdentityGuider:
    """No guidance: the conditional prediction as is."""

    def prepare_inputs(self, x, sigma, cond: dict, uc: dict = None):
        return x, sigma, dict(cond)

    def __call__(self, denoised, sigma=None):
        return denoised

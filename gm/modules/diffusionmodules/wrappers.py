"""Adapts the UNet's signature to the conditioning dict produced by the conditioner (sgm's OpenAIWrapper)."""
from mindspore import nn, ops


class OpenAIWrapper(nn.Cell):
    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, t, cond: dict):
        """cond: {"crossattn", "vector"}, and "cached_kv" where the text's cross-attention keys/values were computed
        beforehand (UNetModel.context_projections)."""
        cached_kv = cond["cached_kv"] if "cached_kv" in cond else None
        return self.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"], cached_kv=cached_kv)


class IFWrapper(nn.Cell):
    """DeepFloyd IF's UNet (if_unet.IFUNet) under the conditioning dict: "crossattn" the T5 embeddings; stage II also
    "concat" (the noised upscaled stage-I image, joined to x on the channel axis, as sgm's concat conditioning) and
    "noise_level" (that image's noising timestep, the UNet's class_labels).

    Returns the eps half of the UNet's 6 channels: what the denoiser and the loss see, so IF trains through the same
    DiscreteDenoiser/EpsScaling/StandardDiffusionLoss as SD 1.x (an MSE on eps; IF's learnt-variance half gets no
    loss here). Ancestral sampling needs both halves and calls the UNet itself (mindbooth/if_cascade.py)."""

    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, t, cond: dict):
        if "concat" in cond:
            x = ops.cat((x, cond["concat"]), axis=1)
        class_labels = cond["noise_level"] if "noise_level" in cond else None
        out = self.diffusion_model(x, t, cond["crossattn"], class_labels)
        return out[:, : out.shape[1] // 2]

"""Adapts the UNet's signature to the conditioning dict produced by the conditioner (sgm's OpenAIWrapper)."""
from mindspore import nn


class OpenAIWrapper(nn.Cell):
    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, t, cond: dict):
        return self.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])

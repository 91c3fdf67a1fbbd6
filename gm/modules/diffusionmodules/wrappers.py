"""Adapts the UNet's signature to the conditioning dict produced by the conditioner (sgm's OpenAIWrapper)."""
from mindspore import nn


class OpenAIWrapper(nn.Cell):
    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x, t, cond: dict):
        """cond: {"crossattn", "vector"}, and "cached_kv" where the text's cross-attention keys/values were computed
        beforehand (UNetModel.context_projections)."""
        cached_kv = cond["cached_kv"] if "cached_kv" in cond else None
        return self.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"], cached_kv=cached_kv)

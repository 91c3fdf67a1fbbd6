"""The UNet's frozen cross-attention keys/values of a text context, computed once for as long as the text stays.

The text of a DreamBooth run (instance and class prompts) and of one sampling call does not change between steps,
and neither do the frozen to_k/to_v weights: their products (UNetModel.context_projections) would otherwise be
recomputed, and their weights cast from fp16, in every step."""
import mindspore as ms
import numpy as np


class ContextProjections:
    """text (Tensor) -> the UNet's context_projections of it as a mutable tuple (a graph input, not a constant),
    recomputed only when the text's values change. Make a new one after the base weights change (a LoRA merge)."""

    def __init__(self, unet):
        self.unet = unet
        self.text = None
        self.projections = None

    def __call__(self, text: ms.Tensor) -> tuple:
        values = text.asnumpy()
        if self.text is None or self.text.shape != values.shape or not np.array_equal(self.text, values):
            self.projections = ms.mutable(self.unet.context_projections(text))
            self.text = values.copy()
        return self.projections

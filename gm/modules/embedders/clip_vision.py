"""CLIP's vision tower with transformers' parameter names (`vision_model.` of a `CLIPModel` file).

The transformer blocks are CLIP's text blocks (`clip.CLIPEncoder`: self_attn, layer_norm1, mlp, layer_norm2) run
without a mask; the vision side adds a class embedding, a patch convolution without bias, `pre_layrnorm` (sic,
transformers' name) before the blocks and `post_layernorm` on the class token after them.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from gm.modules.embedders.clip import LAYER_NORM_EPS, CLIPEncoder, check_sizes


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, width: int, image_size: int, patch_size: int, channels: int):
        super().__init__()
        num_positions = (image_size // patch_size) ** 2 + 1
        self.class_embedding = ms.Parameter(ms.Tensor(np.zeros((width,), np.float32)), name="class_embedding")
        self.patch_embedding = nn.Conv2d(channels, width, patch_size, stride=patch_size, pad_mode="valid",
                                         has_bias=False)
        self.position_embedding = nn.Embedding(num_positions, width)
        self.position_ids = ms.Tensor(np.arange(num_positions, dtype=np.int32)[None])

    def construct(self, pixel_values):
        patches = self.patch_embedding(pixel_values)
        batch, width = patches.shape[0], patches.shape[1]
        patches = patches.reshape(batch, width, -1).transpose(0, 2, 1)
        cls = ops.broadcast_to(self.class_embedding.astype(patches.dtype).reshape(1, 1, width), (batch, 1, width))
        return ops.concat((cls, patches), axis=1) + self.position_embedding(self.position_ids)


class CLIPVisionTransformer(nn.Cell):
    """(B, C, image_size, image_size) pixels -> pooled output (B, width): `post_layernorm` of the class token
    (transformers' `CLIPVisionModel(...).pooler_output`)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str = "quick_gelu",
                 image_size: int = 224, patch_size: int = 32, channels: int = 3):
        super().__init__()
        check_sizes(width, heads, layers)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.num_layers = layers
        self.embeddings = CLIPVisionEmbeddings(width, image_size, patch_size, channels)
        self.pre_layrnorm = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        self.encoder = CLIPEncoder(width, layers, heads, mlp_width, act)
        self.post_layernorm = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        tokens = (image_size // patch_size) ** 2 + 1
        self.no_mask = ms.Tensor(np.zeros((tokens, tokens), np.float32))  # every token sees every token

    def construct(self, pixel_values):
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), self.no_mask, self.num_layers)
        return self.post_layernorm(hidden[:, 0])

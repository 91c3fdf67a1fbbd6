"""ViT image encoder with the parameter names of transformers' `ViTModel` files (facebook/dino-vits16).

The attribute paths reproduce the names in those files (`embeddings.cls_token`,
`encoder.layer.N.attention.attention.query`, `encoder.layer.N.intermediate.dense`, `layernorm`, ...), so a
downloaded DINO checkpoint loads by name. Pre-norm blocks: x + attn(layernorm_before(x)), then
x + mlp(layernorm_after(x)); the last hidden state is normalised by the final `layernorm`.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from gm.modules.embedders.clip import activation, causal_self_attention, check_sizes


class ViTPatchEmbeddings(nn.Cell):
    def __init__(self, channels: int, width: int, patch_size: int):
        super().__init__()
        self.projection = nn.Conv2d(channels, width, patch_size, stride=patch_size, pad_mode="valid", has_bias=True)

    def construct(self, pixel_values):
        """(B, C, H, W) -> (B, patches, width), patches in row-major order."""
        x = self.projection(pixel_values)
        batch, width = x.shape[0], x.shape[1]
        return x.reshape(batch, width, -1).transpose(0, 2, 1)


class ViTEmbeddings(nn.Cell):
    def __init__(self, image_size: int, patch_size: int, channels: int, width: int):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = ms.Parameter(ms.Tensor(np.zeros((1, 1, width), np.float32)), name="cls_token")
        self.position_embeddings = ms.Parameter(ms.Tensor(np.zeros((1, num_patches + 1, width), np.float32)),
                                                name="position_embeddings")
        self.patch_embeddings = ViTPatchEmbeddings(channels, width, patch_size)

    def construct(self, pixel_values):
        patches = self.patch_embeddings(pixel_values)
        cls = ops.broadcast_to(self.cls_token.astype(patches.dtype), (patches.shape[0], 1, patches.shape[2]))
        return ops.concat((cls, patches), axis=1) + self.position_embeddings.astype(patches.dtype)


class ViTSelfAttention(nn.Cell):
    def __init__(self, width: int, qkv_bias: bool):
        super().__init__()
        self.query = nn.Dense(width, width, has_bias=qkv_bias)
        self.key = nn.Dense(width, width, has_bias=qkv_bias)
        self.value = nn.Dense(width, width, has_bias=qkv_bias)


class ViTSelfOutput(nn.Cell):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Dense(width, width)


class ViTAttention(nn.Cell):
    def __init__(self, width: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.attention = ViTSelfAttention(width, qkv_bias)
        self.output = ViTSelfOutput(width)

    def construct(self, x, mask):
        qkv = self.attention
        # CLIP's attention helper takes any additive mask; ViT passes an all-zero one (every token sees every token).
        out = causal_self_attention(qkv.query(x), qkv.key(x), qkv.value(x), self.heads, mask)
        return self.output.dense(out)


class ViTIntermediate(nn.Cell):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.dense = nn.Dense(width, mlp_width)
        self.intermediate_act_fn = activation(act)

    def construct(self, x):
        return self.intermediate_act_fn(self.dense(x))


class ViTOutput(nn.Cell):
    def __init__(self, mlp_width: int, width: int):
        super().__init__()
        self.dense = nn.Dense(mlp_width, width)


class ViTLayer(nn.Cell):
    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float, qkv_bias: bool):
        super().__init__()
        self.attention = ViTAttention(width, heads, qkv_bias)
        self.intermediate = ViTIntermediate(width, mlp_width, act)
        self.output = ViTOutput(mlp_width, width)
        self.layernorm_before = nn.LayerNorm((width,), epsilon=eps)
        self.layernorm_after = nn.LayerNorm((width,), epsilon=eps)

    def construct(self, x, mask):
        x = x + self.attention(self.layernorm_before(x), mask)
        return x + self.output.dense(self.intermediate(self.layernorm_after(x)))


class ViTEncoder(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str, eps: float, qkv_bias: bool):
        super().__init__()
        self.layer = nn.CellList([ViTLayer(width, heads, mlp_width, act, eps, qkv_bias) for _ in range(layers)])

    def construct(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class ViTModel(nn.Cell):
    """(B, C, image_size, image_size) pixels -> last hidden state (B, 1 + patches, width) after the final norm;
    token 0 is [CLS] (DINO's image embedding). The pooler head of the files is not built (DINO does not use it)."""

    def __init__(self, width: int = 384, layers: int = 12, heads: int = 6, mlp_width: int = 1536,
                 image_size: int = 224, patch_size: int = 16, channels: int = 3, act: str = "gelu",
                 layer_norm_eps: float = 1e-12, qkv_bias: bool = True):
        super().__init__()
        check_sizes(width, heads, layers)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.embeddings = ViTEmbeddings(image_size, patch_size, channels, width)
        self.encoder = ViTEncoder(width, layers, heads, mlp_width, act, layer_norm_eps, qkv_bias)
        self.layernorm = nn.LayerNorm((width,), epsilon=layer_norm_eps)
        tokens = (image_size // patch_size) ** 2 + 1
        self.no_mask = ms.Tensor(np.zeros((tokens, tokens), np.float32))

    def construct(self, pixel_values):
        return self.layernorm(self.encoder(self.embeddings(pixel_values), self.no_mask))

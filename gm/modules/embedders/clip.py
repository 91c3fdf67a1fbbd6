"""CLIP ViT-L/14 text transformer (SDXL's first text encoder), with transformers' parameter names.

The attribute paths reproduce `transformers.CLIPTextModel` (`text_model.embeddings...`,
`text_model.encoder.layers.N...`, `text_model.final_layer_norm`), so the official SDXL checkpoint
loads by name. The attention and activation helpers here are shared with `open_clip.py`.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import nn, ops


LAYER_NORM_EPS = 1e-5  # CLIP and OpenCLIP both use torch's default (MindSpore's default is 1e-7)


class QuickGELU(nn.Cell):
    """x * sigmoid(1.702 x): the activation CLIP ViT-L was trained with."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


def activation(name: str) -> nn.Cell:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU(approximate=False)  # exact erf GELU (MindSpore's default is the tanh approximation)
    raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {name!r}")


def causal_mask(length: int) -> ms.Tensor:
    """(length, length) additive mask: token i may attend to tokens 0..i only."""
    mask = np.triu(np.full((length, length), np.finfo(np.float32).min, np.float32), k=1)
    return ms.Tensor(mask)


def causal_self_attention(q, k, v, heads: int, mask):
    """Multi-head attention of (B, L, W) queries/keys/values under an additive (L, L) mask -> (B, L, W)."""
    batch, length, width = q.shape
    head_dim = width // heads

    def split_heads(t):
        return t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * (1.0 / math.sqrt(head_dim))
    scores = scores + mask[:length, :length].astype(scores.dtype)
    out = ops.matmul(ops.softmax(scores, axis=-1), v)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, width)


def check_sizes(width: int, heads: int, layers: int):
    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, width: int, vocab_size: int, max_length: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)
        # transformers keeps `position_ids` as a buffer; here positions are a constant, not a parameter.
        self.position_ids = ms.Tensor(np.arange(max_length, dtype=np.int32)[None])

    def construct(self, input_ids):
        length = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :length])


class CLIPAttention(nn.Cell):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Dense(width, width)
        self.k_proj = nn.Dense(width, width)
        self.v_proj = nn.Dense(width, width)
        self.out_proj = nn.Dense(width, width)

    def construct(self, x, mask):
        out = causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask)
        return self.out_proj(out)


class CLIPMLP(nn.Cell):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.fc1 = nn.Dense(width, mlp_width)
        self.activation_fn = activation(act)
        self.fc2 = nn.Dense(mlp_width, width)

    def construct(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(width, mlp_width, act)
        self.layer_norm2 = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(width, heads, mlp_width, act) for _ in range(layers)])

    def construct(self, x, mask, num_layers: int):
        """Run the first `num_layers` layers (later ones cannot change their output)."""
        for i in range(num_layers):
            x = self.layers[i](x, mask)
        return x


class CLIPTextTransformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str, vocab_size: int, max_length: int):
        super().__init__()
        check_sizes(width, heads, layers)
        self.num_layers = layers
        self.embeddings = CLIPTextEmbeddings(width, vocab_size, max_length)
        self.encoder = CLIPEncoder(width, layers, heads, mlp_width, act)
        self.final_layer_norm = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        self.causal_mask = causal_mask(max_length)

    def construct(self, input_ids, num_layers: int):
        """(B, L) ids -> output of layer `num_layers` (transformers' hidden_states[num_layers]), no final norm."""
        return self.encoder(self.embeddings(input_ids), self.causal_mask, num_layers)


class CLIPTextModel(nn.Cell):
    """The `text_model` wrapper level of transformers' CLIPTextModel (it only adds a name)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str = "quick_gelu",
                 vocab_size: int = 49408, max_length: int = 77):
        super().__init__()
        self.text_model = CLIPTextTransformer(width, layers, heads, mlp_width, act, vocab_size, max_length)

    def construct(self, input_ids, num_layers: int):
        return self.text_model(input_ids, num_layers)

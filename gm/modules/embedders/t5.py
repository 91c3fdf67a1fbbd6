"""T5 v1.1 text encoder (DeepFloyd IF's `google/t5-v1_1-xxl`, encoder only), with transformers' parameter names.

The attribute paths reproduce `transformers.T5EncoderModel` (`shared`, `encoder.block.N.layer.0.SelfAttention.q`,
`encoder.block.N.layer.1.DenseReluDense.wi_0`, `encoder.final_layer_norm`), so the released weights load by name.
T5 v1.1: RMS layer norms without bias, unscaled dot-product attention with a learned relative-position bias (computed
by the first block, added in every block), a gated-GELU feed-forward, no biases anywhere.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bucket of each key position relative to each query position, bidirectional, as T5 defines
    it: half the buckets per direction; within each half, exact distances below num_buckets/4, then log-spaced up to
    max_distance. float32 arithmetic, as the reference computes it (the truncation at bucket edges depends on it)."""
    position = np.arange(length, dtype=np.int64)
    relative = position[None, :] - position[:, None]  # key - query
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    # distances below max_exact take the exact bucket; clamping them to 1 only keeps log() finite
    scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact), dtype=np.float32)
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + scaled.astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Cell):
    """x / rms(x) * weight: no mean subtraction and no bias; the mean square is taken in fp32."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = Parameter(initializer("ones", (width,), ms.float32), name="weight")
        self.eps = eps

    def construct(self, x):
        x32 = x.astype(ms.float32)
        x32 = x32 * ops.rsqrt(ops.mean(x32 * x32, axis=-1, keep_dims=True) + self.eps)
        return self.weight.astype(x.dtype) * x32.astype(x.dtype)


class T5Embedding(nn.Cell):
    """Token embedding with transformers' parameter name (`shared.weight`)."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (vocab_size, width), ms.float32), name="weight")

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)


class T5Attention(nn.Cell):
    """Self-attention without the 1/sqrt(d) scale (T5 folds it into the initialisation)."""

    def __init__(self, width: int, heads: int, head_dim: int, has_relative_attention_bias: bool, num_buckets: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q = nn.Dense(width, inner, has_bias=False)
        self.k = nn.Dense(width, inner, has_bias=False)
        self.v = nn.Dense(width, inner, has_bias=False)
        self.o = nn.Dense(inner, width, has_bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = T5Embedding(num_buckets, heads)

    def position_bias(self, buckets):
        """(L, L) buckets -> (1, heads, L, L) additive bias."""
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def construct(self, x, bias):
        batch, length, _ = x.shape

        def split_heads(t):
            return t.reshape(batch, length, self.heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        scores = ops.matmul(q, k.swapaxes(-1, -2)).astype(ms.float32) + bias
        weights = ops.softmax(scores, axis=-1).astype(v.dtype)
        out = ops.matmul(weights, v).transpose(0, 2, 1, 3).reshape(batch, length, self.heads * self.head_dim)
        return self.o(out)


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, width, heads, head_dim, has_relative_attention_bias, num_buckets, eps):
        super().__init__()
        self.SelfAttention = T5Attention(width, heads, head_dim, has_relative_attention_bias, num_buckets)
        self.layer_norm = T5LayerNorm(width, eps)

    def construct(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Cell):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's gated-GELU feed-forward."""

    def __init__(self, width: int, ff_width: int):
        super().__init__()
        self.wi_0 = nn.Dense(width, ff_width, has_bias=False)
        self.wi_1 = nn.Dense(width, ff_width, has_bias=False)
        self.wo = nn.Dense(ff_width, width, has_bias=False)

    def construct(self, x):
        return self.wo(ops.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Cell):
    def __init__(self, width, ff_width, eps):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(width, ff_width)
        self.layer_norm = T5LayerNorm(width, eps)

    def construct(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Cell):
    def __init__(self, width, ff_width, heads, head_dim, has_relative_attention_bias, num_buckets, eps):
        super().__init__()
        self.layer = nn.CellList([
            T5LayerSelfAttention(width, heads, head_dim, has_relative_attention_bias, num_buckets, eps),
            T5LayerFF(width, ff_width, eps),
        ])

    def construct(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Cell):
    def __init__(self, width, ff_width, layers, heads, head_dim, num_buckets, eps):
        super().__init__()
        self.block = nn.CellList([
            T5Block(width, ff_width, heads, head_dim, i == 0, num_buckets, eps) for i in range(layers)
        ])
        self.final_layer_norm = T5LayerNorm(width, eps)


class T5EncoderModel(nn.Cell):
    """input_ids (B, L) and attention_mask (B, L) of 1/0 -> last hidden state (B, L, width)."""

    def __init__(self, vocab_size: int = 32128, width: int = 4096, ff_width: int = 10240, layers: int = 24,
                 heads: int = 64, head_dim: int = 64, num_buckets: int = 32, max_distance: int = 128,
                 max_length: int = 512, eps: float = 1e-6):
        super().__init__()
        self.shared = T5Embedding(vocab_size, width)
        self.encoder = T5Stack(width, ff_width, layers, heads, head_dim, num_buckets, eps)
        self.buckets = ms.Tensor(relative_position_buckets(max_length, num_buckets, max_distance).astype(np.int32))

    def construct(self, input_ids, attention_mask):
        length = input_ids.shape[-1]
        x = self.shared(input_ids)
        first_attention = self.encoder.block[0].layer[0].SelfAttention
        # the relative-position bias of block 0 plus the padding mask, added to every block's scores
        padding = (1.0 - attention_mask.astype(ms.float32))[:, None, None, :] * np.finfo(np.float32).min
        bias = first_attention.position_bias(self.buckets[:length, :length]).astype(ms.float32) + padding
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

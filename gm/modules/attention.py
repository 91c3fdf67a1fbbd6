"""Transformer parts of the UNet: attention, GEGLU feed-forward, BasicTransformerBlock and the SpatialTransformer,
with sgm's parameter names.

The attention itself is a small parameterless cell picked by `attn_type` (sgm's `spatial_transformer_attn_type`):
`vanilla` (MindSpore's ops, any device) or `flash-attention` (MindSpore's flash-attention op, Ascend)."""
import mindspore as ms
from mindspore import nn, ops

from gm.modules.diffusionmodules.util import conv2d, zero_module
from gm.modules.lora import with_lora_delta


class VanillaAttention(nn.Cell):
    """softmax(q k^T * scale) v per head, q/k/v as (batch, tokens, heads * dim_head). In fp32 whatever the compute
    dtype: an fp16 softmax over 4096 tokens overflows."""

    def __init__(self, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale

    def _split_heads(self, x):
        batch, tokens, _ = x.shape
        return x.astype(ms.float32).reshape(batch, tokens, self.heads, -1).swapaxes(1, 2)

    def construct(self, q, k, v):
        dtype = q.dtype
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        probabilities = ops.softmax(ops.matmul(q, k.swapaxes(-1, -2)) * self.scale, axis=-1)
        out = ops.matmul(probabilities, v)
        batch, _, tokens, _ = out.shape
        return out.swapaxes(1, 2).reshape(batch, tokens, -1).astype(dtype)


class FlashAttention(nn.Cell):
    """MindSpore's flash-attention op (`ops.flash_attention_score`, layout BSH: no head transposes), as MindONE's
    SDXL uses it on Ascend. It takes fp16/bf16: fp32 inputs are computed in fp16."""

    def __init__(self, heads: int, scale: float):
        super().__init__()
        device = ms.get_context("device_target")
        if device != "Ascend":
            raise ValueError(f"spatial_transformer_attn_type 'flash-attention' needs MindSpore's flash-attention op, "
                             f"which runs on Ascend only; use 'vanilla' on {device}")
        self.heads, self.scale = heads, scale

    def construct(self, q, k, v):
        dtype = q.dtype
        compute = dtype if dtype in (ms.float16, ms.bfloat16) else ms.float16
        out = ops.flash_attention_score(q.astype(compute), k.astype(compute), v.astype(compute), self.heads,
                                        scalar_value=self.scale, input_layout="BSH")
        return out.astype(dtype)


ATTENTION_TYPES = {"vanilla": VanillaAttention, "flash-attention": FlashAttention}


def attention_op(attn_type: str, heads: int, scale: float) -> nn.Cell:
    if attn_type not in ATTENTION_TYPES:
        raise ValueError(f"spatial_transformer_attn_type must be one of {sorted(ATTENTION_TYPES)}, got {attn_type!r}")
    return ATTENTION_TYPES[attn_type](heads, scale)


class CrossAttention(nn.Cell):
    """Multi-head attention: self-attention when `context` is None (attn1), cross-attention on the text context
    otherwise (attn2). to_q/to_k/to_v have no bias, as in SDXL.

    `cached_kv`: (k, v), the frozen to_k/to_v products of `context` computed beforehand (UNetModel.context_projections);
    only the LoRA updates of to_k/to_v are then computed here. The text of a DreamBooth run or of one sampling call
    does not change between steps, so those products need computing once."""

    def __init__(self, query_dim: int, context_dim: int = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 attn_type: str = "vanilla"):
        super().__init__()
        inner_dim = heads * dim_head
        self.is_cross = context_dim is not None  # attends to a text context (attn2)
        context_dim = query_dim if context_dim is None else context_dim
        self.attention = attention_op(attn_type, heads, dim_head**-0.5)
        self.to_q = nn.Dense(query_dim, inner_dim, has_bias=False)
        self.to_k = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_v = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_out = nn.SequentialCell([nn.Dense(inner_dim, query_dim), nn.Dropout(p=dropout)])

    def project_context(self, text):
        """(k, v): the frozen parts of to_k and to_v applied to `text` (no LoRA), for `cached_kv`."""
        return _base_projection(self.to_k, text), _base_projection(self.to_v, text)

    def construct(self, x, context=None, cached_kv=None):
        q = self.to_q(x)
        if cached_kv is not None:
            k = with_lora_delta(self.to_k, cached_kv[0].astype(q.dtype), context)
            v = with_lora_delta(self.to_v, cached_kv[1].astype(q.dtype), context)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        return self.to_out(self.attention(q, k, v))


def _base_projection(layer: nn.Cell, x):
    """W x (+ b) of a Dense layer without its LoRA, the weight cast to x's dtype. Called outside a graph it runs op by
    op, each cast copy of a weight freed after its product."""
    bias = layer.bias.astype(x.dtype) if layer.has_bias else None
    return ops.dense(x, layer.weight.astype(x.dtype), bias)


class GatedGELU(nn.Cell):
    """value * gelu(gate) over the two halves of the last axis (exact erf GELU)."""

    def construct(self, x):
        value, gate = ops.chunk(x, 2, axis=-1)
        return value * ops.gelu(gate, approximate="none")


class GEGLU(nn.Cell):
    """Gated GELU: one projection gives the value and its gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out * 2)
        self.gated_gelu = GatedGELU()

    def construct(self, x):
        return self.gated_gelu(self.proj(x))


class FeedForward(nn.Cell):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim), nn.Dropout(p=dropout), nn.Dense(inner_dim, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int, dropout: float = 0.0,
                 attn_type: str = "vanilla"):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout, attn_type=attn_type)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    attn_type=attn_type)
        self.norm1 = nn.LayerNorm((dim,), epsilon=1e-5)
        self.norm2 = nn.LayerNorm((dim,), epsilon=1e-5)
        self.norm3 = nn.LayerNorm((dim,), epsilon=1e-5)

    def construct(self, x, context, cached_kv=None):
        """`cached_kv`: attn2's (k, v) of `context` (CrossAttention), or None."""
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, cached_kv) + x
        return self.ff(self.norm3(x)) + x


class SwapAxes12(nn.Cell):
    """x with axes 1 and 2 swapped: (batch, channels, pixels) <-> (batch, pixels, channels)."""

    def construct(self, x):
        return x.swapaxes(1, 2)


class SpatialTransformer(nn.Cell):
    """GroupNorm, proj_in, `depth` transformer blocks over the flattened pixels, proj_out, residual. The projections
    are linear over the pixels' channels (`use_linear`: SD 2.x, SDXL) or 1x1 convolutions before the flattening and
    after it is undone (SD 1.x): the same product, stored as (C, C) or (C, C, 1, 1)."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int, context_dim: int, dropout: float = 0.0,
                 attn_type: str = "vanilla", use_linear: bool = True):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.use_linear = use_linear
        # Built in the released order (proj_in, blocks, proj_out): parameter order is the state-dict order
        self.proj_in = nn.Dense(in_channels, inner_dim) if use_linear else conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dropout, attn_type) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Dense(inner_dim, in_channels) if use_linear else conv2d(inner_dim, in_channels, 1))
        self.swap_axes = SwapAxes12()
        self.depth = depth

    def construct(self, x, context, cached_kv=None):
        """`cached_kv`: (k, v) of `context` for each block's attn2 in turn (2 * depth tensors), or None."""
        batch, channels, height, width = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = self.swap_axes(x.reshape(batch, x.shape[1], height * width))
        if self.use_linear:
            x = self.proj_in(x)
        index = 0
        for block in self.transformer_blocks:
            x = block(x, context, None if cached_kv is None else cached_kv[index:index + 2])
            index += 2
        if self.use_linear:
            x = self.proj_out(x)
        x = self.swap_axes(x).reshape(batch, x.shape[-1], height, width)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in

"""Layers of DeepFloyd IF's UNet as diffusers builds it (`UNet2DConditionModel` with IF's configuration): norms,
the scale-shift ResnetBlock2D with its own down/upsampling, the added-key/value attention and the time and pooled
text embeddings.

Parameter names are diffusers' own, one to one: IF's weights are released only as diffusers folders, so a state
dict loads by name with no key map. The rule for norms: GroupNorm and LayerNorm here are small cells whose
parameters are literally `weight` and `bias` (MindSpore's nn.GroupNorm/nn.LayerNorm would name them gamma/beta).
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from gm.modules.attention import attention_op
from gm.modules.diffusionmodules.openaimodel import NearestUpsample2x
from gm.modules.diffusionmodules.util import conv2d

ACTIVATIONS = ("gelu", "silu", "swish")


def activation(name: str) -> nn.Cell:
    """diffusers' get_activation for the functions IF's configurations use (GELU is the exact erf one)."""
    if name == "gelu":
        return nn.GELU(approximate=False)
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm over (N, C, *) with parameters named `weight`/`bias` (diffusers' names). Plain ops, so it
    runs as is on every device."""

    casts_weights_at_use = True  # may be stored in fp16 (gm/modules/frozen_weights.py)

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias")

    def construct(self, x):
        shape = x.shape
        grouped = x.reshape(shape[0], self.num_groups, -1)
        mean = grouped.mean(axis=-1, keep_dims=True)
        centred = grouped - mean
        variance = (centred * centred).mean(axis=-1, keep_dims=True)
        normed = (centred * ops.rsqrt(variance + self.eps)).reshape(shape)
        per_channel = (self.num_channels,) + (1,) * (len(shape) - 2)
        return normed * self.weight.astype(x.dtype).reshape(per_channel) + self.bias.astype(x.dtype).reshape(per_channel)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm over the last axis with parameters named `weight`/`bias`."""

    casts_weights_at_use = True

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.layer_norm(x, self.weight.astype(x.dtype), self.bias.astype(x.dtype))[0]


class AvgPool2x(nn.Cell):
    """(N, C, H, W) -> (N, C, H/2, W/2), the mean of each 2x2 block (diffusers' Downsample2D without a conv)."""

    def construct(self, x):
        batch, channels, height, width = x.shape
        return x.reshape(batch, channels, height // 2, 2, width // 2, 2).mean(axis=(3, 5))


class ResnetBlock2D(nn.Cell):
    """diffusers' ResnetBlock2D: norm1-act-[resample]-conv1, the time embedding added (`default`) or applied as
    scale and shift after norm2 (`scale_shift`), act-dropout-conv2, a 1x1 shortcut when the width changes, and the
    sum divided by `output_scale_factor`. `up`/`down`: nearest 2x upsampling or 2x2 average pooling of both the input
    and the hidden state (IF's resamplers are such blocks). `skip_time_act`: the time embedding is projected without
    the activation first."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int = 32, eps: float = 1e-6,
                 act_fn: str = "silu", time_embedding_norm: str = "default", skip_time_act: bool = False,
                 output_scale_factor: float = 1.0, dropout: float = 0.0, up: bool = False, down: bool = False):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"resnet_time_scale_shift must be 'default' or 'scale_shift', got {time_embedding_norm!r}")
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Dense(temb_channels, out_channels * 2 if self.scale_shift else out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.resample = NearestUpsample2x() if up else (AvgPool2x() if down else None)
        self.conv_shortcut = conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x, temb):
        h = self.nonlinearity(self.norm1(x))
        if self.resample is not None:
            x = self.resample(x)
            h = self.resample(h)
        h = self.conv1(h)
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = ops.chunk(temb, 2, axis=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + temb)
        h = self.conv2(self.dropout(self.nonlinearity(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class AddedKVAttention(nn.Cell):
    """diffusers' Attention with `added_kv_proj_dim` under AttnAddedKVProcessor (IF's only attention): GroupNorm of
    the pixels, queries from the pixels; keys and values are the text's (add_k_proj/add_v_proj of the text, itself
    group-normed by `norm_cross`) followed by the pixels' own (to_k/to_v; none with `only_cross_attention`);
    to_out, then the residual. Every projection has a bias."""

    def __init__(self, query_dim: int, added_kv_proj_dim: int, heads: int, dim_head: int, norm_num_groups: int,
                 cross_attention_norm: str = None, only_cross_attention: bool = False, dropout: float = 0.0,
                 attn_type: str = "vanilla"):
        super().__init__()
        if cross_attention_norm not in (None, "group_norm"):
            raise ValueError(f"cross_attention_norm must be 'group_norm' (IF) or None, got {cross_attention_norm!r}")
        inner_dim = heads * dim_head
        self.only_cross_attention = only_cross_attention
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=1e-5)
        # diffusers' cross_attention_norm_num_groups is 32 whatever the UNet's norm_num_groups
        self.norm_cross = GroupNorm(32, added_kv_proj_dim, eps=1e-5) if cross_attention_norm else None
        self.to_q = nn.Dense(query_dim, inner_dim)
        self.to_k = None if only_cross_attention else nn.Dense(query_dim, inner_dim)
        self.to_v = None if only_cross_attention else nn.Dense(query_dim, inner_dim)
        self.add_k_proj = nn.Dense(added_kv_proj_dim, inner_dim)
        self.add_v_proj = nn.Dense(added_kv_proj_dim, inner_dim)
        self.to_out = nn.SequentialCell([nn.Dense(inner_dim, query_dim), nn.Dropout(p=dropout)])
        self.attention = attention_op(attn_type, heads, dim_head**-0.5)

    def construct(self, x, text):
        batch, channels, height, width = x.shape
        pixels = self.group_norm(x.reshape(batch, channels, height * width)).swapaxes(1, 2)
        if self.norm_cross is not None:
            text = self.norm_cross(text.swapaxes(1, 2)).swapaxes(1, 2)
        q = self.to_q(pixels)
        k, v = self.add_k_proj(text), self.add_v_proj(text)
        if not self.only_cross_attention:
            k = ops.cat((k, self.to_k(pixels)), axis=1)
            v = ops.cat((v, self.to_v(pixels)), axis=1)
        out = self.to_out(self.attention(q, k, v))
        return out.swapaxes(1, 2).reshape(batch, channels, height, width) + x


class TimestepEmbedding(nn.Cell):
    """linear_1, activation, linear_2 (diffusers' TimestepEmbedding): the time MLP, and stage II's noise-level one."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Dense(in_channels, time_embed_dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Dense(time_embed_dim, time_embed_dim)

    def construct(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class AttentionPooling(nn.Cell):
    """IF's pooling of the text tokens into one vector: a class token (the tokens' mean plus a learnt position)
    attends over itself and the tokens; its output is the pooled text."""

    casts_weights_at_use = True  # its own parameter, the position

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"addition_embed_type_num_heads {num_heads} does not divide the text width {embed_dim}")
        self.positional_embedding = Parameter(
            ms.Tensor(np.random.default_rng(0).standard_normal((1, embed_dim)).astype(np.float32) / embed_dim**0.5),
            name="positional_embedding")
        self.k_proj = nn.Dense(embed_dim, embed_dim)
        self.q_proj = nn.Dense(embed_dim, embed_dim)
        self.v_proj = nn.Dense(embed_dim, embed_dim)
        self.num_heads = num_heads
        self.dim_per_head = embed_dim // num_heads

    def _heads(self, x):
        """(B, L, H * D) -> (B, H, L, D)."""
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.dim_per_head).swapaxes(1, 2)

    def construct(self, x):
        batch, _, width = x.shape
        class_token = x.mean(axis=1, keep_dims=True) + self.positional_embedding.astype(x.dtype)
        tokens = ops.cat((class_token, x), axis=1)
        q = self._heads(self.q_proj(class_token))
        k = self._heads(self.k_proj(tokens))
        v = self._heads(self.v_proj(tokens))
        scale = 1 / math.sqrt(math.sqrt(self.dim_per_head))  # on q and k each, as IF (steadier in fp16)
        weight = ops.softmax(ops.matmul(q * scale, (k * scale).swapaxes(-1, -2)).astype(ms.float32), axis=-1)
        pooled = ops.matmul(weight.astype(v.dtype), v)  # (B, H, 1, D)
        return pooled.reshape(batch, width)


class TextTimeEmbedding(nn.Cell):
    """addition_embed_type "text": LayerNorm, attention pooling, projection to the time-embedding width, LayerNorm.
    Added to the time embedding, so the whole prompt conditions every ResnetBlock."""

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64):
        super().__init__()
        self.norm1 = LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Dense(encoder_dim, time_embed_dim)
        self.norm2 = LayerNorm(time_embed_dim)

    def construct(self, text):
        return self.norm2(self.proj(self.pool(self.norm1(text))))

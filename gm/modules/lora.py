"""LoRA (Hu et al., 2021) on attention projections: the UNet's, and optionally the text encoders'.

A wrapped `nn.Dense` keeps its frozen `weight`/`bias` under the same names and gains `lora_A` (rank x in)
and `lora_B` (out x rank): y = W x + b + (alpha / rank) * B A dropout(x). B starts at zero, so a fresh
LoRA changes nothing. Names follow MindONE (`…attn1.to_q.lora_A.weight`), so its LoRA checkpoints load.
A fused q/k/v projection (OpenCLIP's `in_proj_weight`) gets one LoRA per q, k, v (`…attn.in_proj_lora.q_proj.lora_A.weight`).
"""
import math
from typing import Sequence

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform

from gm.util import child, replace_child

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_ATTENTIONS = ("attn1", "attn2")


class LoRABranch(nn.Cell):
    """The low-rank update alone: (alpha / rank) * B A dropout(x), with A (rank x in) and B (out x rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self._build_lora(in_features, out_features, rank, alpha, dropout)

    def _build_lora(self, in_features, out_features, rank, alpha, dropout):
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(f"LoRA rank must be in 1..{min(in_features, out_features)} for a {in_features}->{out_features} layer, got {rank}")
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.lora_dropout = nn.Dropout(p=dropout)
        # A as peft initialises it (Kaiming-uniform, a=sqrt(5)); B zero.
        self.lora_A = nn.Dense(in_features, rank, has_bias=False, weight_init=HeUniform(negative_slope=math.sqrt(5)))
        self.lora_B = nn.Dense(rank, out_features, has_bias=False, weight_init="zeros")
        self.merged = False

    def construct(self, x):
        return self.low_rank_update(x)

    def low_rank_update(self, x):
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        # alpha == rank (the default) scales by 1: no pass over the layer's output, forward or backward
        return update if self.scale == 1.0 else update * self.scale

    def delta_weight(self):
        return ops.matmul(self.lora_B.weight.astype(ms.float32), self.lora_A.weight.astype(ms.float32)) * self.scale


class LoRADense(LoRABranch):
    """An `nn.Dense` with a LoRA branch: y = W x + b + (alpha / rank) * B A dropout(x). W and b keep their dtype
    (fp16/bf16 for a frozen base, gm.modules.frozen_weights) and are cast to x's at use."""

    casts_weights_at_use = True  # gm.modules.frozen_weights may store weight/bias in a low-precision dtype

    def __init__(self, base, rank: int, alpha: float, dropout: float = 0.0):
        nn.Cell.__init__(self)
        out_features, in_features = base.weight.shape
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias if base.has_bias else None
        self._build_lora(in_features, out_features, rank, alpha, dropout)
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def base_product(self, x_2d):
        """W x + b on (rows, in) with nn.Dense's ops: a fresh LoRA is bit-identical to no LoRA."""
        out = self.matmul(x_2d, self.weight.astype(x_2d.dtype))
        return self.bias_add(out, self.bias.astype(x_2d.dtype)) if self.has_bias else out

    def construct(self, x):
        x_shape = x.shape
        x_2d = x.reshape(-1, x_shape[-1])
        out = self.base_product(x_2d)
        if not self.merged:
            out = out + self.low_rank_update(x_2d)
        return out.reshape(x_shape[:-1] + (out.shape[-1],))

    def delta(self, x):
        """The LoRA update alone, (alpha / rank) * B A dropout(x), as construct adds it."""
        out = self.low_rank_update(x.reshape(-1, x.shape[-1]))
        return out.reshape(x.shape[:-1] + (out.shape[-1],))

    def merge(self, scale: float = 1.0):
        """Fold scale * (alpha/rank) * B A into the base weight; the layer then skips its LoRA branch."""
        if self.merged:
            raise RuntimeError("LoRA already merged into this layer")
        self.weight.set_data((self.weight.astype(ms.float32) + scale * self.delta_weight()).astype(self.weight.dtype))
        self.merged = True
        self._merge_scale = scale

    def unmerge(self):
        if not self.merged:
            raise RuntimeError("LoRA is not merged into this layer")
        self.weight.set_data((self.weight.astype(ms.float32) - self._merge_scale * self.delta_weight()).astype(self.weight.dtype))
        self.merged = False


def with_lora_delta(layer: nn.Cell, base_out, x):
    """`base_out` (the layer's frozen projection of x) plus the layer's LoRA update of x, if it has an unmerged LoRA:
    equal to layer(x)."""
    if isinstance(layer, LoRADense) and not layer.merged:
        return base_out + layer.delta(x)
    return base_out


class FusedQKVLoRA(nn.Cell):
    """One LoRA each for q, k and v of a fused projection (torch MultiheadAttention's `in_proj_weight`, rows q|k|v),
    as peft puts them on the separate q_proj/k_proj/v_proj of transformers' CLIP: qkv + [dq | dk | dv]."""

    def __init__(self, width: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.q_proj = LoRABranch(width, width, rank, alpha, dropout)
        self.k_proj = LoRABranch(width, width, rank, alpha, dropout)
        self.v_proj = LoRABranch(width, width, rank, alpha, dropout)
        self.merged = False

    def construct(self, x, qkv):
        if self.merged:
            return qkv
        return qkv + ops.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), axis=-1).astype(qkv.dtype)

    def branches(self):
        return (self.q_proj, self.k_proj, self.v_proj)

    def merge(self, in_proj_weight, scale: float = 1.0):
        if self.merged:
            raise RuntimeError("LoRA already merged into this layer")
        delta = ops.cat([branch.delta_weight() for branch in self.branches()], axis=0)
        in_proj_weight.set_data((in_proj_weight.astype(ms.float32) + scale * delta).astype(in_proj_weight.dtype))
        self._set_merged(True, scale)

    def unmerge(self, in_proj_weight):
        if not self.merged:
            raise RuntimeError("LoRA is not merged into this layer")
        delta = ops.cat([branch.delta_weight() for branch in self.branches()], axis=0)
        in_proj_weight.set_data((in_proj_weight.astype(ms.float32) - self._merge_scale * delta).astype(in_proj_weight.dtype))
        self._set_merged(False, self._merge_scale)

    def _set_merged(self, merged, scale):
        self.merged, self._merge_scale = merged, scale
        for branch in self.branches():
            branch.merged = merged  # what lora_layers() callers see


def _is_attention(name: str, cell: nn.Cell, attentions: Sequence[str]) -> bool:
    """`name`'s last part is in `attentions`, or it is an item of a CellList named so (IF's `attentions.0`)."""
    parts = name.split(".")
    return (parts[-1] in attentions and not isinstance(cell, nn.CellList)) or (len(parts) > 1 and parts[-1].isdigit() and parts[-2] in attentions)


def inject_lora(
    net: nn.Cell,
    rank: int = 4,
    alpha: float = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    attentions: Sequence[str] = DEFAULT_ATTENTIONS,
) -> int:
    """Wrap `target_modules` of every attention cell named in `attentions` inside `net` with LoRADense.
    Parameter names are then reset to their paths from `net`, so call it on the checkpoint's root Cell.
    Returns the number of wrapped layers. alpha defaults to rank (scale 1)."""
    alpha = rank if alpha is None else alpha
    attention_cells = [cell for name, cell in net.cells_and_names() if _is_attention(name, cell, attentions)]
    wrapped = 0
    for attention in attention_cells:
        for target in target_modules:
            *path, last = target.split(".")
            parent = attention
            for part in path:
                parent = child(parent, part)
            layer = child(parent, last)
            if isinstance(layer, LoRADense):
                raise RuntimeError("LoRA is already injected into this network")
            if not isinstance(layer, nn.Dense):
                raise TypeError(f"LoRA target '{target}' is a {type(layer).__name__}, not a Dense layer")
            replace_child(parent, last, LoRADense(layer, rank, alpha, dropout))
            wrapped += 1
    if not wrapped:
        raise ValueError(f"no attention layers named {list(attentions)} found to put LoRA on")
    for name, param in net.parameters_and_names():
        param.name = name
    return wrapped


def inject_fused_qkv_lora(net: nn.Cell, rank: int = 4, alpha: float = None, dropout: float = 0.0) -> int:
    """Give every attention cell in `net` that has a fused `in_proj_weight` (3W x W) and an `in_proj_lora`
    slot a FusedQKVLoRA. Parameter names are then reset to their paths from `net`. Returns the count."""
    alpha = rank if alpha is None else alpha
    wrapped = 0
    for _, cell in net.cells_and_names():
        if hasattr(cell, "in_proj_lora") and hasattr(cell, "in_proj_weight"):
            if cell.in_proj_lora is not None:
                raise RuntimeError("LoRA is already injected into this network")
            cell.in_proj_lora = FusedQKVLoRA(cell.in_proj_weight.shape[1], rank, alpha, dropout)
            wrapped += 1
    if not wrapped:
        raise ValueError("no fused q/k/v attention (in_proj_weight) found to put LoRA on")
    for name, param in net.parameters_and_names():
        param.name = name
    return wrapped


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(net: nn.Cell):
    """Every LoRA branch (a LoRADense, or one of q/k/v of a FusedQKVLoRA): each has `rank`, `scale`, `merged`."""
    return [cell for _, cell in net.cells_and_names() if isinstance(cell, LoRABranch)]


def freeze_all_but_lora(net: nn.Cell):
    """Only LoRA parameters train; everything else is frozen base model."""
    for param in net.get_parameters():
        param.requires_grad = is_lora_name(param.name)


def lora_parameters(net: nn.Cell) -> dict:
    """{name: Parameter} of the LoRA weights only, MindONE names."""
    return {name: param for name, param in net.parameters_and_names() if is_lora_name(name)}


def set_lora_merged(net: nn.Cell, merged: bool, scale: float = 1.0):
    for _, cell in net.cells_and_names():
        if isinstance(cell, LoRADense):
            if merged and not cell.merged:
                cell.merge(scale)
            elif not merged and cell.merged:
                cell.unmerge()
        elif isinstance(getattr(cell, "in_proj_lora", None), FusedQKVLoRA):
            if merged and not cell.in_proj_lora.merged:
                cell.in_proj_lora.merge(cell.in_proj_weight, scale)
            elif not merged and cell.in_proj_lora.merged:
                cell.in_proj_lora.unmerge(cell.in_proj_weight)


def new_lora_init(shape, seed_rng) -> ms.Tensor:
    """A fresh lora_A draw from a numpy Generator (identical on every data-parallel rank)."""
    fan_in = shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))  # Kaiming-uniform with a=sqrt(5)
    return ms.Tensor(seed_rng.uniform(-bound, bound, size=shape).astype("float32"))

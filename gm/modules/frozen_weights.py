"""Frozen base weights stored in a low-precision dtype (fp16/bf16) and cast to the compute dtype at use.

Halves the memory of the frozen model while every op still computes in the input's dtype (fp32 on CPU, where
MindSpore's fp16/bf16 kernels are slow or missing). SDXL's released weights are fp16, so storing them in fp16 loses
nothing. Parameter names (`weight`, `bias`, `gamma`, `beta`) and objects stay the same, so checkpoints load as before.
"""
import mindspore as ms
from mindspore import nn

from gm.util import become

DTYPES = {"float16": ms.float16, "fp16": ms.float16, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}


class FrozenDense(nn.Dense):
    """nn.Dense (no activation) whose weight and bias may be stored in another dtype than its input's."""

    casts_weights_at_use = True

    def construct(self, x):
        x_shape = x.shape
        x_2d = x.reshape(-1, x_shape[-1])
        out = self.matmul(x_2d, self.weight.astype(x.dtype))
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(x.dtype))
        return out.reshape(x_shape[:-1] + (out.shape[-1],))


class FrozenConv2d(nn.Conv2d):
    """nn.Conv2d whose weight and bias may be stored in another dtype than its input's."""

    casts_weights_at_use = True

    def construct(self, x):
        out = self.conv2d(x, self.weight.astype(x.dtype))
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(x.dtype))
        return out


def storage_dtype(dtype: str):
    """The MindSpore dtype of a frozen weight dtype's name (a DTYPES key), or a ValueError that lists the names."""
    if dtype not in DTYPES:
        raise ValueError(f"frozen weight dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def stored_in(net: nn.Cell, dtype: str) -> nn.Cell:
    """`net` with every parameter stored in `dtype` (a DTYPES key), one at a time: for a part of a frozen base
    model as soon as it is built (UNetModel's weight_dtype), before store_frozen_weights gives its layers the
    cast-at-use forms. Returns net."""
    dtype = storage_dtype(dtype)
    for param in net.get_parameters():
        param.set_dtype(dtype)
    return net


def _casts_at_use(cell: nn.Cell) -> bool:
    """Whether the layer already casts its parameters to its input's dtype (MindSpore's norms do)."""
    return getattr(cell, "casts_weights_at_use", False) or isinstance(cell, (nn.GroupNorm, nn.LayerNorm))


def store_frozen_weights(net: nn.Cell, dtype="float16") -> int:
    """Store every frozen (requires_grad=False) parameter of `net`'s Dense, Conv2d, GroupNorm and LayerNorm layers
    (and LoRA layers' base weights) in `dtype`; those layers cast them to their input's dtype at use. Trainable
    parameters (LoRA) keep their dtype. Call after LoRA injection and freezing. Returns the number of layers changed."""
    dtype = storage_dtype(dtype)
    changed = 0
    for _, cell in net.cells_and_names():
        params = list(cell.get_parameters(expand=False))
        if not params or any(p.requires_grad for p in params):
            continue
        if type(cell) is nn.Dense:
            if cell.activation_flag:
                raise ValueError("a frozen Dense layer with an activation cannot be stored in low precision")
            become(cell, FrozenDense)
        elif type(cell) is nn.Conv2d:
            become(cell, FrozenConv2d)
        elif not _casts_at_use(cell):
            continue
        for param in params:
            param.set_dtype(dtype)
        changed += 1
    return changed

"""Frozen base weights stored in a low-precision dtype (fp16/bf16) and cast to the compute dtype at use.

Halves the memory of the frozen model (full SDXL UNet: 10.3 GB fp32 -> 5.2 GB) while every op still
computes in fp32 (MindSpore's CPU kernels are slow or missing in fp16/bf16). SDXL's released weights
are fp16, so storing them in fp16 loses nothing.

Two MindSpore behaviours make a plain `weight.astype(x.dtype)` keep a full fp32 copy of every weight
alive (measured, benchmarks/RESULTS.md "Frozen weights in fp16"):
- GRAPH mode schedules a cast that depends only on a Parameter early, so all casts of a forward pass
  live at once; CastLike (gm/modules/weight_cast.py) makes each cast wait for the layer's input.
- Autodiff saves the cast weight for the backward pass (dx = dout W); the cells below have a custom
  bprop that casts the weight again instead, so no fp32 copy outlives its layer.
Parameter names (`weight`, `bias`, `gamma`, `beta`) and objects stay the same, so checkpoints load as before.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.modules import cpu_kernels
from gm.modules.conv import Conv2d
from gm.modules.weight_cast import CastLike

DTYPES = {"float16": ms.float16, "fp16": ms.float16, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16}


def _dense_shape(x, weight, *bias):
    return [x[0], weight[0]]


def _dense_input_gradient_shape(dout, weight):
    return [dout[0], weight[1]]


class CastMatMul(nn.Cell):
    """x (N, in) @ weight(out, in).T with the weight cast to x's dtype; the backward recasts it.
    Where the CPU kernels have oneDNN, an fp16 weight with fp32 x goes to their Dense kernels
    (gm/modules/cpu_kernels/dense.cc), which convert it a block at a time while multiplying: no fp32 copy of the
    whole weight is written and read back."""

    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.matmul_back = ops.MatMul()
        self.cast_like = CastLike()
        self.fused = cpu_kernels.onednn_enabled()
        if self.fused:
            self.forward_kernel = cpu_kernels.kernel("DenseForward", _dense_shape, cpu_kernels.same_as_first)
            self.input_gradient_kernel = cpu_kernels.kernel(
                "DenseBackwardData", _dense_input_gradient_shape, cpu_kernels.same_as_first)

    def add_flags(self, **flags):
        if cpu_kernels.lowers_precision(flags):
            self.fused = False
        return super().add_flags(**flags)

    def in_kernel(self, x, weight) -> bool:
        return self.fused and x.dtype == ms.float32 and weight.dtype == ms.float16

    def construct(self, x, weight):
        if self.in_kernel(x, weight):
            return self.forward_kernel(x, weight)
        return self.matmul(x, self.cast_like(weight, x))

    def input_gradient(self, dout, weight):
        if self.in_kernel(dout, weight):
            return self.input_gradient_kernel(dout, weight)
        return self.matmul_back(dout, self.cast_like(weight, dout))

    def bprop(self, x, weight, out, dout):
        # The weight is frozen: its gradient is never used, zeros keep the bprop's signature.
        return self.input_gradient(dout, weight), ops.zeros_like(weight)


class CastMatMulBias(CastMatMul):
    """CastMatMul plus a frozen bias stored like the weight; the Dense kernel adds it to each block of the output
    as it writes it, instead of a BiasAdd pass over the whole output."""

    def __init__(self):
        super().__init__()
        self.bias_add = ops.BiasAdd()

    def construct(self, x, weight, bias):
        if self.in_kernel(x, weight) and bias.dtype == ms.float16:
            return self.forward_kernel(x, weight, bias)
        return self.bias_add(self.matmul(x, self.cast_like(weight, x)), bias.astype(x.dtype))

    def bprop(self, x, weight, bias, out, dout):
        return self.input_gradient(dout, weight), ops.zeros_like(weight), ops.zeros_like(bias)


class CastConv2D(nn.Cell):
    """ops.Conv2D with the weight cast to x's dtype; the backward recasts it."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv2d = conv.conv2d
        self.conv2d_back = ops.Conv2DBackpropInput(
            out_channel=conv.out_channels, kernel_size=conv.kernel_size, mode=1, pad_mode=conv.pad_mode,
            pad=conv.padding, stride=conv.stride, dilation=conv.dilation, group=conv.group, data_format=conv.data_format,
        )

    def construct(self, x, weight):
        return self.conv2d(x, ops.depend(weight, x).astype(x.dtype))

    def bprop(self, x, weight, out, dout):
        dx = self.conv2d_back(dout, ops.depend(weight, dout).astype(dout.dtype), x.shape)
        return dx, ops.zeros_like(weight)


class FrozenDense(nn.Cell):
    """nn.Dense (no activation) whose weight and bias are stored in a low-precision dtype."""

    def __init__(self, base: nn.Dense):
        super().__init__()
        if base.activation_flag:
            raise ValueError("FrozenDense does not support nn.Dense's activation; apply it as a separate layer")
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias if base.has_bias else None
        self.cast_matmul = CastMatMulBias() if base.has_bias else CastMatMul()

    def construct(self, x):
        x_shape = x.shape
        x_2d = x.reshape(-1, x_shape[-1])
        out = self.cast_matmul(x_2d, self.weight, self.bias) if self.has_bias else self.cast_matmul(x_2d, self.weight)
        return out.reshape(x_shape[:-1] + (out.shape[-1],))


class FrozenConv2d(nn.Cell):
    """nn.Conv2d whose weight and bias are stored in a low-precision dtype."""

    def __init__(self, base: nn.Conv2d):
        super().__init__()
        self.weight = base.weight
        self.has_bias = base.has_bias
        self.bias = base.bias if base.has_bias else None
        self.cast_conv2d = CastConv2D(base)
        self.bias_add = ops.BiasAdd(data_format=base.data_format)

    def construct(self, x):
        out = self.cast_conv2d(x, self.weight)
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(x.dtype))
        return out


def _replace_child(parent: nn.Cell, name: str, new: nn.Cell):
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


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


def store_frozen_weights(net: nn.Cell, dtype="float16") -> int:
    """Store every frozen (requires_grad=False) parameter of `net`'s Dense, Conv2d, GroupNorm and LayerNorm
    layers (and LoRADense base weights) in `dtype`, computing in the input's dtype. Trainable parameters
    (LoRA) keep their dtype. Call after LoRA injection and freezing. Returns the number of layers changed."""
    from gm.modules.lora import LoRADense  # lora.py imports CastMatMul from here

    dtype = storage_dtype(dtype)
    # (parent, child name, cell) first, then replace: replacing while iterating cells_and_names is unsafe.
    found = []
    for _, parent in net.cells_and_names():
        for name, cell in parent.name_cells().items():
            found.append((parent, name, cell))
    changed = 0
    for parent, name, cell in found:
        params = list(cell.get_parameters(expand=False))
        if not params or any(p.requires_grad for p in params):
            continue
        if isinstance(cell, nn.Dense):
            _replace_child(parent, name, FrozenDense(cell))
        elif isinstance(cell, Conv2d) and cell.as_matmul:
            cell.freeze_weight()
        elif isinstance(cell, nn.Conv2d):
            _replace_child(parent, name, FrozenConv2d(cell))
        elif isinstance(cell, LoRADense):
            cell.low_precision_base = True  # its lora_A/lora_B are trainable children, not in `params`
        elif not isinstance(cell, (nn.GroupNorm, nn.LayerNorm)):  # these already cast gamma/beta to x's dtype
            continue
        for param in params:
            param.set_dtype(dtype)
        changed += 1
    return changed

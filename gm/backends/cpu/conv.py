"""The CPU backend's convolution: a frozen weight's stride-1 convolution by the oneDNN kernel (kernels/conv.cc, 3x3 by
Winograd's F(4x4, 3x3) where it pays), which reads an fp16 weight as stored; anything else as im2col + MatMul, since
MindSpore 2.10's CPU Conv2D kernel is far slower than its MatMul on SDXL's shapes. A frozen weight's backward computes
only the input gradient.

The im2col columns are k*k times the input, so a large input (the VAE at 1024x1024) is done in strips of output rows
that keep the columns under `MAX_COLUMNS_BYTES`.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.backends.cpu import kernels
from gm.backends.cpu.weight_cast import CastLike
from gm.modules.frozen_weights import FrozenConv2d

MAX_COLUMNS_BYTES = 512 * 2**20
# The oneDNN kernel's algorithm for 3x3 padding-1 convolutions (kernels/conv.cc): Winograd's
# F(4x4, 3x3) where it pays ("auto"), oneDNN's direct convolution, or Winograd wherever it applies.
CONVOLUTION_ALGORITHMS = {"auto": 0, "direct": 1, "winograd": 2}


def _is_pointwise(kernel_size: int, stride: int, padding: int) -> bool:
    """A 1x1 conv without stride or padding: a plain matmul over pixels, no columns needed."""
    return kernel_size == 1 and stride == 1 and padding == 0


def _output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class FrozenWeightConv(nn.Cell):
    """The convolution of a frozen weight, stored in fp32 or fp16/bf16 (gm.modules.frozen_weights), which gives only
    the input gradient. Where the CPU kernels have oneDNN (stride 1, fp32 x, an fp16 or fp32 weight), their
    convolution, reading an fp16 weight as stored; its backward kernel is the forward primitive's own bprop, which
    reads only dout and the weight, so that Cell.recompute of an enclosing block (gradient checkpointing) works: with
    a Cell bprop here, a recomputed ResBlock's recomputation ran during the forward. Otherwise
    HandWrittenFrozenConv."""

    def __init__(self, kernel_size: int, stride: int, padding: int, fused=None, algorithm: str = "auto"):
        super().__init__()
        self.hand_written = HandWrittenFrozenConv(kernel_size, stride, padding, fused, algorithm)
        if self.hand_written.fused:
            backward_kernel = self.hand_written.conv_backward_data

            def conv_bprop(x, weight, config, out, dout):
                return backward_kernel(dout.astype(x.dtype), weight, config), ops.zeros_like(weight), ops.zeros_like(config)

            self.forward_kernel = kernels.kernel("Conv2dForward", _conv_output_shape(kernel_size, padding),
                                                     kernels.same_as_first, bprop=conv_bprop)

    @property
    def fused(self) -> bool:
        return self.hand_written.fused

    def computes_in_kernel(self, x) -> bool:
        return self.hand_written.computes_in_kernel(x)

    def construct(self, x, weight):
        if self.hand_written.computes_in_kernel(x) and (weight.dtype == ms.float16 or weight.dtype == ms.float32):
            return self.forward_kernel(x, weight, self.hand_written.config)
        return self.hand_written(x, weight)


def _conv_output_shape(kernel_size: int, padding: int):
    """out_shape of the stride-1 convolution kernel: each output size follows from the input size."""
    grow = 2 * padding - kernel_size + 1
    return lambda x, w, config: [x[0], w[0], x[2] + grow, x[3] + grow]


class HandWrittenFrozenConv(nn.Cell):
    """The whole-input (no strips) im2col convolution for a frozen weight, stored in fp32 or fp16/bf16
    (gm.modules.frozen_weights); where the CPU kernels have oneDNN, their convolution instead (here for a weight
    cast to fp32, a bf16 one). The cast waits for the input; the custom backward gives only the input gradient,
    fold(W^T dout), recomputed from x's shape and the weight, so neither the columns (k*k times x) nor an fp32 copy
    of the weight is kept for it. W^T is taken inside BatchMatMul (transpose_a): autodiff's explicit Transpose of
    the weight made MindSpore's CPU Transpose kernel hold a buffer of twice the weight's fp32 size for the whole
    run, per conv (lean_ops)."""

    def __init__(self, kernel_size: int, stride: int, padding: int, fused=None, algorithm: str = "auto"):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.matmul_transposed_weight = ops.BatchMatMul(transpose_a=True)
        self.cast_like = CastLike()
        self.fused = (kernels.has_onednn() if fused is None else fused) and stride == 1
        if self.fused:  # stride 1: each output size follows from the input size and back, for the kernels' shapes
            grow = 2 * padding - kernel_size + 1
            self.config = ms.Tensor([padding, CONVOLUTION_ALGORITHMS[algorithm]], ms.float32)
            self.conv_forward = kernels.kernel("Conv2dForward", _conv_output_shape(kernel_size, padding),
                                                   kernels.same_as_first)
            self.conv_backward_data = kernels.kernel(
                "Conv2dBackwardData", lambda dy, w, config: [dy[0], w[1], dy[2] - grow, dy[3] - grow],
                kernels.same_as_first)

    def _weight_for(self, weight, like):
        """The weight in like's dtype; but an fp16 weight as stored where the oneDNN kernel computes with fp32
        `like`: the kernel reads fp16 itself, so no fp32 copy of the weight is made."""
        if self.fused and like.dtype == ms.float32 and weight.dtype == ms.float16:
            return weight
        return self.cast_like(weight, like)

    def computes_in_kernel(self, x) -> bool:
        """Whether x goes to the oneDNN kernel (any weight dtype: an fp16 weight as stored, others cast to fp32),
        which makes no columns, so it needs no strips however large x is."""
        return self.fused and x.dtype == ms.float32

    def construct(self, x, weight):
        weight = self._weight_for(weight, x)
        if self.computes_in_kernel(x):
            return self.conv_forward(x, weight, self.config)
        return _conv_columns_matmul(x, weight.reshape(weight.shape[0], -1), self.kernel_size, self.stride, self.padding)

    def bprop(self, x, weight, out, dout):
        batch, out_channels, out_height, out_width = dout.shape
        dout = dout.astype(x.dtype)  # under Cell.to_float the incoming gradient may keep the caller's dtype
        weight_for = self._weight_for(weight, dout)
        if self.computes_in_kernel(dout):
            return self.conv_backward_data(dout, weight_for, self.config), ops.zeros_like(weight)
        weight_2d = weight_for.reshape(out_channels, -1)  # (out, in*k*k)
        grad_columns = self.matmul_transposed_weight(per_sample(weight_2d, batch),
                                                     dout.reshape(batch, out_channels, out_height * out_width))
        if _is_pointwise(self.kernel_size, self.stride, self.padding):
            grad_x = grad_columns.reshape(x.shape)
        else:  # fold is unfold's adjoint: it sums each column entry back onto the pixel it was read from
            grad_x = ops.fold(grad_columns, ms.Tensor(x.shape[2:], ms.int32), self.kernel_size,
                              padding=self.padding, stride=self.stride)
        # The weight is frozen: its gradient is never used, zeros keep the bprop's signature.
        return grad_x, ops.zeros_like(weight)


def per_sample(weight_2d, batch: int):
    """(batch, out, in*k*k): the weight once per sample, for BatchMatMul, which does not broadcast its batch axis on
    CPU. By Concat: MindSpore's CPU BroadcastTo (what ops.matmul uses to broadcast) is much slower than Concat at
    these sizes."""
    weight_3d = weight_2d.expand_dims(0)
    return weight_3d if batch == 1 else ops.cat((weight_3d,) * batch)


def _conv_columns_matmul(x, weight_2d, kernel_size: int, stride: int, padding: int):
    """x (batch, in, h, w) convolved with weight_2d (out, in*k*k) as one unfold + MatMul."""
    batch, in_channels, height, width = x.shape
    out_channels = weight_2d.shape[0]
    if _is_pointwise(kernel_size, stride, padding):
        out = ops.bmm(per_sample(weight_2d, batch), x.reshape(batch, in_channels, height * width))
        return out.reshape(batch, out_channels, height, width)
    out_height, out_width = (_output_size(size, kernel_size, stride, padding) for size in (height, width))
    columns = ops.unfold(x, kernel_size=kernel_size, padding=padding, stride=stride)  # (batch, in*k*k, pixels)
    return ops.bmm(per_sample(weight_2d, batch), columns).reshape(batch, out_channels, out_height, out_width)


def conv2d_as_matmul(x, weight, kernel_size: int, stride: int, padding: int, frozen_conv=None):
    """Convolution of x (batch, in, height, width) with weight (out, in, k, k), no dilation or groups.
    `frozen_conv`: a FrozenWeightConv when the weight is frozen."""
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    out_height, out_width = (_output_size(size, kernel_size, stride, padding) for size in (height, width))
    columns_bytes = batch * in_channels * kernel_size**2 * out_height * out_width * 4
    if frozen_conv is not None and frozen_conv.computes_in_kernel(x):
        # No columns, so no strips: at 1024x1024 the strips of the UNet's widest 3x3 convs (e.g. 960 -> 320
        # channels at 128x128) cost the sampling step seconds in pad, unfold and BatchMatMul.
        return frozen_conv(x, weight)
    if columns_bytes <= MAX_COLUMNS_BYTES or _is_pointwise(kernel_size, stride, padding):
        if frozen_conv is not None:
            return frozen_conv(x, weight)
        return _conv_columns_matmul(x, weight.astype(x.dtype).reshape(out_channels, -1), kernel_size, stride, padding)
    # Strips of output rows, for inference-size inputs such as the VAE at 1024. Only here is the input padded
    # with ops.pad: a GRAPH-mode training step of the tiny model that padded every conv this way hung inside a
    # CPU kernel after 1-3 steps (MindSpore 2.10), where unfold's own padding runs on.
    x = ops.pad(x, (padding, padding, padding, padding))
    weight_2d = weight.astype(x.dtype).reshape(out_channels, -1)
    strip_rows = _ceil_div(out_height, _ceil_div(columns_bytes, MAX_COLUMNS_BYTES))
    strips = []
    for first_row in range(0, out_height, strip_rows):
        rows = min(strip_rows, out_height - first_row)
        # output rows [first_row, first_row + rows) read padded input rows [first_row*stride, (last row)*stride + k)
        x_strip = x[:, :, first_row * stride:(first_row + rows - 1) * stride + kernel_size]
        columns = ops.unfold(x_strip, kernel_size=kernel_size, stride=stride)
        strips.append(ops.matmul(weight_2d, columns).reshape(batch, out_channels, rows, out_width))
    return ops.cat(strips, axis=2)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and names) by im2col + MatMul, or, once `freeze_weight` is called, by
    FrozenWeightConv. Square kernels, equal stride and padding on both axes, no dilation or groups: all SDXL uses."""

    def init_kernels(self):
        if self.group != 1 or self.dilation != (1, 1) or len(set(self.kernel_size)) != 1 or len(set(self.stride)) != 1:
            raise ValueError(f"the CPU backend's convolution takes square kernels without groups or dilation, got {self}")
        self.square_kernel_size, self.square_stride = self.kernel_size[0], self.stride[0]
        padding = self.padding if isinstance(self.padding, int) else self.padding[0]
        self.square_padding = padding
        self.frozen_conv = None
        if not self.weight.requires_grad:
            self.freeze_weight()

    @property
    def frozen_weight(self) -> bool:
        return self.frozen_conv is not None

    def freeze_weight(self, fused=None, algorithm: str = "auto"):
        """From now on this conv computes no weight gradient (FrozenWeightConv's backward), for a frozen weight in
        any storage dtype. `fused`: the oneDNN kernel for stride 1 (default: where built), else im2col;
        `algorithm`: that kernel's (CONVOLUTION_ALGORITHMS)."""
        self.frozen_conv = FrozenWeightConv(self.square_kernel_size, self.square_stride, self.square_padding,
                                            fused=fused, algorithm=algorithm)

    def thaw_weight(self):
        """The weight trains again (DiffusionEngine.make_trainable): back to the im2col + MatMul form, whose autodiff
        gives the weight gradient that FrozenWeightConv's backward leaves at zero."""
        self.frozen_conv = None

    def supports_recompute(self) -> bool:
        """Whether Cell.recompute of an enclosing block (gradient checkpointing) works with this convolution: a frozen
        weight's kernel, whose backward reads only dout and the weight. With im2col a recomputed ResBlock failed to
        compile."""
        return self.frozen_conv is not None and self.frozen_conv.fused

    def construct(self, x):
        out = conv2d_as_matmul(x, self.weight, self.square_kernel_size, self.square_stride, self.square_padding,
                               self.frozen_conv)
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(x.dtype))
        return out


class KernelFrozenConv2d(Conv2d, FrozenConv2d):
    """The CPU backend's form of a FrozenConv2d (a weight stored in fp16/bf16): Conv2d's, which casts as it needs."""

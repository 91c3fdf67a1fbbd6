"""Conv2d as im2col + MatMul on CPU.

MindSpore 2.10's CPU `Conv2D` kernel runs at about 1 GFLOP/s on SDXL's shapes (14-16 s for one 3x3 conv
at the latents of a 512x512 image), while its MatMul reaches the machine's BLAS speed. Unfolding the input
into columns and multiplying by the (out, in*k*k) weight gives the same numbers 64-111x faster
(benchmarks/bench_conv.py, RESULTS.md section 8). On Ascend/GPU the native kernel is kept.

The columns are k*k times the input, so a large input (the VAE at 1024x1024) is done in strips of output
rows that keep the columns under `MAX_COLUMNS_BYTES`. A frozen weight (freeze_convolutions; every conv of a
LoRA run) goes through FrozenWeightConv, whose own backward computes only the input gradient; where the CPU
kernels have oneDNN (gm/modules/cpu_kernels), its stride-1 convolutions run there instead of im2col, whole at any
size (the kernel makes no columns). A trainable weight keeps plain autodiff.
"""
import mindspore as ms
from mindspore import nn, ops

from gm.modules import cpu_kernels
from gm.modules.weight_cast import CastLike

MAX_COLUMNS_BYTES = 512 * 2**20
# The oneDNN kernel's algorithm for 3x3 padding-1 convolutions (gm/modules/cpu_kernels/conv.cc): Winograd's
# F(4x4, 3x3) where it pays ("auto"), oneDNN's direct convolution, or Winograd wherever it applies.
CONVOLUTION_ALGORITHMS = {"auto": 0, "direct": 1, "winograd": 2}


def matmul_convolution_default() -> bool:
    """im2col + MatMul where the native kernel is slow: the CPU backend."""
    return ms.get_context("device_target") == "CPU"


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

            self.forward_kernel = cpu_kernels.kernel("Conv2dForward", _conv_output_shape(kernel_size, padding),
                                                     cpu_kernels.same_as_first, bprop=conv_bprop)

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
    run, per conv (gm/modules/lean_ops.py has the measurements)."""

    def __init__(self, kernel_size: int, stride: int, padding: int, fused=None, algorithm: str = "auto"):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.matmul_transposed_weight = ops.BatchMatMul(transpose_a=True)
        self.cast_like = CastLike()
        self.fused = (cpu_kernels.onednn_enabled() if fused is None else fused) and stride == 1
        if self.fused:  # stride 1: each output size follows from the input size and back, for the kernels' shapes
            grow = 2 * padding - kernel_size + 1
            self.config = ms.Tensor([padding, CONVOLUTION_ALGORITHMS[algorithm]], ms.float32)
            self.conv_forward = cpu_kernels.kernel("Conv2dForward", _conv_output_shape(kernel_size, padding),
                                                   cpu_kernels.same_as_first)
            self.conv_backward_data = cpu_kernels.kernel(
                "Conv2dBackwardData", lambda dy, w, config: [dy[0], w[1], dy[2] - grow, dy[3] - grow],
                cpu_kernels.same_as_first)

    def add_flags(self, **flags):
        if cpu_kernels.lowers_precision(flags):
            self.fused = False
        return super().add_flags(**flags)

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
    CPU. By Concat: MindSpore's CPU BroadcastTo (what ops.matmul uses to broadcast) is about 14x slower than Concat at
    these sizes (benchmarks/bench_op_cores.py)."""
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
        # channels at 128x128) took 9 s of the sampling step in pad, unfold and BatchMatMul.
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
    """`nn.Conv2d` (same parameters `weight`/`bias`, same checkpoint layout) computed as im2col + MatMul on CPU.

    Square kernels, equal stride and padding on both axes, no dilation or groups: all SDXL uses.
    `as_matmul=None` picks by device (CPU: im2col); False keeps MindSpore's Conv2D kernel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 has_bias: bool = True, as_matmul: bool = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=padding,
                         has_bias=has_bias)
        self.as_matmul = matmul_convolution_default() if as_matmul is None else as_matmul
        self.square_kernel_size, self.square_stride, self.square_padding = kernel_size, stride, padding
        self.frozen_conv = None  # a FrozenWeightConv once freeze_weight is called

    @property
    def frozen_weight(self) -> bool:
        return self.frozen_conv is not None

    def freeze_weight(self, fused=None, algorithm: str = "auto"):
        """From now on this conv computes no weight gradient (FrozenWeightConv's backward): for a frozen weight,
        in any storage dtype. Called by freeze_convolutions and gm.modules.frozen_weights, before compiling.
        `fused`: the oneDNN CPU kernel for stride 1 (default: where available), else im2col; `algorithm`: that
        kernel's (CONVOLUTION_ALGORITHMS)."""
        if self.frozen_conv is None:
            self.frozen_conv = FrozenWeightConv(self.square_kernel_size, self.square_stride, self.square_padding,
                                                fused=fused, algorithm=algorithm)

    def supports_recompute(self) -> bool:
        """Whether Cell.recompute of an enclosing block (gradient checkpointing) works with this convolution:
        MindSpore's Conv2D, or a frozen weight's CPU kernel, whose backward reads only dout and the weight. With
        the frozen im2col path, a recomputed ResBlock failed to compile."""
        return not self.as_matmul or (self.frozen_conv is not None and self.frozen_conv.fused)

    def construct(self, x):
        if not self.as_matmul:
            return super().construct(x)
        out = conv2d_as_matmul(x, self.weight, self.square_kernel_size, self.square_stride, self.square_padding,
                               self.frozen_conv)
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(x.dtype))
        return out


def freeze_convolutions(net: nn.Cell) -> int:
    """Mark every im2col Conv2d of `net` whose weight does not require a gradient as frozen (freeze_weight).
    Call after freezing the parameters and before compiling. Returns the number of convolutions marked."""
    marked = 0
    for _, cell in net.cells_and_names():
        if isinstance(cell, Conv2d) and cell.as_matmul and not cell.weight.requires_grad:
            cell.freeze_weight()
            marked += 1
    return marked

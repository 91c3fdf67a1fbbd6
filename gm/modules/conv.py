"""Conv2d as im2col + MatMul on CPU.

MindSpore 2.10's CPU `Conv2D` kernel runs at about 1 GFLOP/s on SDXL's shapes (14-16 s for one 3x3 conv
at the latents of a 512x512 image), while its MatMul reaches the machine's BLAS speed. Unfolding the input
into columns and multiplying by the (out, in*k*k) weight gives the same numbers 64-111x faster
(benchmarks/bench_conv.py, RESULTS.md section 8). On Ascend/GPU the native kernel is kept.

The columns are k*k times the input, so a large input (the VAE at 1024x1024) is done in strips of output
rows that keep the columns under `MAX_COLUMNS_BYTES`. Autodiff through unfold + MatMul keeps no columns for
the backward pass when the weight is frozen (measured: same peak memory as a custom backward).
"""
import mindspore as ms
from mindspore import nn, ops

MAX_COLUMNS_BYTES = 512 * 2**20


def matmul_convolution_default() -> bool:
    """im2col + MatMul where the native kernel is slow: the CPU backend."""
    return ms.get_context("device_target") == "CPU"


class WeightMatMul(nn.Cell):
    """(out, in*k*k) weight @ (batch, in*k*k, pixels) columns, the weight cast to the columns' dtype."""

    def construct(self, weight, columns):
        return ops.matmul(weight.astype(columns.dtype), columns)


class CastWeightMatMul(nn.Cell):
    """WeightMatMul for a frozen weight stored in fp16/bf16 (gm.modules.frozen_weights): the cast waits for
    the columns and the backward casts again, so no fp32 copy of the weight outlives its layer."""

    def construct(self, weight, columns):
        return ops.matmul(ops.depend(weight, columns).astype(columns.dtype), columns)

    def bprop(self, weight, columns, out, dout):
        # The weight is frozen: its gradient is never used, zeros keep the bprop's signature.
        weight_t = ops.depend(weight, dout).astype(dout.dtype).T
        return ops.zeros_like(weight), ops.matmul(weight_t, dout)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def conv2d_as_matmul(x, weight, weight_matmul, kernel_size: int, stride: int, padding: int):
    """Convolution of x (batch, in, height, width) with weight (out, in, k, k), no dilation or groups."""
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    weight_2d = weight.reshape(out_channels, -1)
    if kernel_size == 1 and stride == 1 and padding == 0:  # a 1x1 conv is a plain matmul over pixels
        out = weight_matmul(weight_2d, x.reshape(batch, in_channels, height * width))
        return out.reshape(batch, out_channels, height, width)
    out_height = (height + 2 * padding - kernel_size) // stride + 1
    out_width = (width + 2 * padding - kernel_size) // stride + 1
    columns_bytes = batch * in_channels * kernel_size**2 * out_height * out_width * 4
    if columns_bytes <= MAX_COLUMNS_BYTES:
        columns = ops.unfold(x, kernel_size=kernel_size, padding=padding, stride=stride)  # (batch, in*k*k, pixels)
        return weight_matmul(weight_2d, columns).reshape(batch, out_channels, out_height, out_width)
    # Strips of output rows, for inference-size inputs such as the VAE at 1024. Only here is the input padded
    # with ops.pad: a GRAPH-mode training step of the tiny model that padded every conv this way hung inside a
    # CPU kernel after 1-3 steps (MindSpore 2.10), where unfold's own padding runs on.
    x = ops.pad(x, (padding, padding, padding, padding))
    strip_rows = _ceil_div(out_height, _ceil_div(columns_bytes, MAX_COLUMNS_BYTES))
    strips = []
    for first_row in range(0, out_height, strip_rows):
        rows = min(strip_rows, out_height - first_row)
        # output rows [first_row, first_row + rows) read padded input rows [first_row*stride, (last row)*stride + k)
        x_strip = x[:, :, first_row * stride:(first_row + rows - 1) * stride + kernel_size]
        columns = ops.unfold(x_strip, kernel_size=kernel_size, stride=stride)
        strips.append(weight_matmul(weight_2d, columns).reshape(batch, out_channels, rows, out_width))
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
        self.weight_matmul = WeightMatMul()

    def store_weight_low_precision(self):
        """Called by gm.modules.frozen_weights once the frozen weight is fp16/bf16."""
        self.weight_matmul = CastWeightMatMul()

    def construct(self, x):
        if not self.as_matmul:
            return super().construct(x)
        out = conv2d_as_matmul(x, self.weight, self.weight_matmul, self.square_kernel_size, self.square_stride,
                               self.square_padding)
        if self.has_bias:
            out = self.bias_add(out, self.bias.astype(x.dtype))
        return out

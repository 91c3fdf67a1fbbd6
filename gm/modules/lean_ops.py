"""Elementwise ops written around per-kernel buffers of MindSpore 2.10's CPU kernels in GRAPH mode.

Measured on this machine (16 chained ops on a 64 MiB fp32 tensor, one GRAPH-mode Cell, RSS after two runs;
the memory pool itself peaks at a few tensors, these buffers live outside it, one per op in the graph, for
as long as the graph exists):
- Add, Sub and Div with a broadcast operand (a bias row, a (B, C, 1, 1) embedding, a 0-d Tensor) hold 4x
  the output: +4.2 GiB. Mul with the broadcast operand second does not; `x + broadcast_to(y, x.shape)` does not
  (+0.2 GiB), nor does BiasAdd, nor a Python-float operand.
- ops.gelu(approximate='none') is built from a 0-d-Tensor Div and Add: +4.2 GiB forward, +11.2 GiB with its
  backward. `gelu` below: +0.2 GiB, +1.2 GiB with its backward, and faster.
- Transpose holds 2x its output (+2.2 GiB); mint.transpose does not (+0.2 GiB, but 5x slower), nor do
  BatchMatMul/MatMul with transpose flags.
- The softmax backward (y * (dout - sum(dout * y))) broadcasts a Sub: +5.2 GiB; `softmax_backward` +1.2 GiB.
The same graphs in PyNative mode, and these replacements, stay near one tensor per op. The results are the
same to float rounding, on every backend.

The backward passes below recompute what they need from their input, and that input waits for the incoming
gradient (ops.depend): otherwise GRAPH mode merges the recomputation with the forward's (common-subexpression
elimination) or runs it during the forward, and its results stay alive until the backward, which is what
recomputing avoids.
"""
import mindspore as ms
from mindspore import mint, nn, ops

from gm.modules import cpu_kernels

SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def add_broadcast(x, y):
    """x + y where y broadcasts to x's shape (e.g. a (B, C, 1, 1) embedding onto (B, C, H, W))."""
    return x + ops.broadcast_to(y, x.shape)


def swap_axes(x, axis0: int, axis1: int):
    """x with two axes swapped, by mint.transpose: no per-kernel buffer (ops.Transpose keeps 2x its output), but
    about 5x slower on CPU (100 vs 21 ms per 64 MiB); where a MatMul follows, prefer its transpose flags."""
    return mint.transpose(x, axis0, axis1)


def _middle_axes_swapped(shape):
    return [shape[0], shape[2], shape[1], *shape[3:]]


class SwapAxes12(nn.Cell):
    """x with axes 1 and 2 swapped, contiguous. Where cpu_kernels.enabled(), one copy kernel in the forward and the
    backward: mint.transpose's view is made contiguous between kernels, which the CPU profile showed as idle time
    before the next BatchMatMul or Reshape. Elsewhere swap_axes."""

    def __init__(self, fused=None):
        super().__init__()
        self.fused = cpu_kernels.enabled() if fused is None else fused
        if self.fused:
            self.kernel = cpu_kernels.kernel("SwapAxes12", _middle_axes_swapped, cpu_kernels.same_as_first)

    def construct(self, x):
        if self.fused and x.dtype == ms.float32:
            return self.kernel(x)
        return swap_axes(x, 1, 2)

    def bprop(self, x, out, dout):
        dout = dout.astype(x.dtype)
        if self.fused and x.dtype == ms.float32:
            return (self.kernel(dout),)
        return (swap_axes(dout, 1, 2),)


class Fp32KernelPair(nn.Cell):
    """A layer with an fp32 CPU kernel each way (`forward`, `backward`, where `fused`, default
    cpu_kernels.enabled()); subclasses keep MindSpore's ops for other dtypes, and take them under
    Cell.to_float(float16/bfloat16), which casts the kernels' inputs too (cpu_kernels.lowers_precision)."""

    def __init__(self, forward: str, backward: str, forward_shape=cpu_kernels.same_as_first,
                 backward_shape=cpu_kernels.same_as_first, fused=None):
        super().__init__()
        self.fused = cpu_kernels.enabled() if fused is None else fused
        if self.fused:
            self.forward = cpu_kernels.kernel(forward, forward_shape, cpu_kernels.same_as_first)
            self.backward = cpu_kernels.kernel(backward, backward_shape, cpu_kernels.same_as_first)

    def add_flags(self, **flags):
        if cpu_kernels.lowers_precision(flags):
            self.fused = False
        return super().add_flags(**flags)


def _doubled_sides(x):
    return [x[0], x[1], 2 * x[2], 2 * x[3]]


def _halved_sides(dy):
    return [dy[0], dy[1], dy[2] // 2, dy[3] // 2]


class NearestUpsample2x(Fp32KernelPair):
    """(N, C, H, W) -> (N, C, 2H, 2W), each pixel repeated over a 2x2 block. Where cpu_kernels.enabled(), a CPU
    kernel each way (MindSpore's CPU ResizeNearestNeighborV2Grad: 78 ms per call at the full-size UNet's 64x64
    level, for a memory-bound sum over 2x2 blocks); elsewhere ops.interpolate."""

    def __init__(self, fused=None):
        super().__init__("Upsample2xNearest", "Upsample2xNearestBackward", _doubled_sides, _halved_sides, fused)

    def construct(self, x):
        if self.fused and x.dtype == ms.float32:
            return self.forward(x)
        height, width = x.shape[-2:]
        return ops.interpolate(x, size=(height * 2, width * 2), mode="nearest")

    def bprop(self, x, out, dout):
        dout = dout.astype(x.dtype)
        if self.fused and x.dtype == ms.float32:
            return (self.backward(dout),)
        batch, channels, height, width = x.shape  # the adjoint of the repeat: each 2x2 block summed
        return (dout.reshape(batch, channels, height, 2, width, 2).sum(axis=(3, 5)),)


def softmax_backward(probabilities, grad_probabilities):
    """The input gradient of y = softmax(x) along the last axis: y * dout - y * sum(y * dout), with no broadcast Sub.
    The row sums, and their spreading back over each row, are MatMuls with a column and a row of ones: at attention
    sizes MindSpore's CPU ReduceSum over the last axis runs 35x and BroadcastTo 4.5x slower than torch's, and a Mul by
    a (..., 1) operand holds 4x its output per op in GRAPH mode; this is 4.3x faster than ReduceSum + BroadcastTo
    (benchmarks/bench_op_cores.py, RESULTS.md section 14)."""
    weighted = probabilities * grad_probabilities
    tokens = weighted.shape[-1]
    row_sums = ops.matmul(weighted, ops.ones((tokens, 1), weighted.dtype))
    return weighted - probabilities * ops.matmul(row_sums, ops.ones((1, tokens), weighted.dtype))


class GELU(nn.Cell):
    """Exact (erf) GELU, x * Phi(x), from Python-float constants, with its own backward
    dout * (Phi(x) + x * phi(x)) that keeps only x."""

    def construct(self, x):
        return 0.5 * x * (1.0 + ops.erf(x * SQRT_HALF))

    def bprop(self, x, out, dout):
        dout = dout.astype(x.dtype)  # under Cell.to_float the incoming gradient may keep the caller's dtype
        x = ops.depend(x, dout)  # see the module's docstring
        return (dout * gelu_derivative(x),)


def gelu_derivative(x):
    """d gelu(x) / dx = Phi(x) + x * phi(x), from Python-float constants."""
    cdf = 0.5 * (1.0 + ops.erf(x * SQRT_HALF))
    return cdf + x * (ops.exp(-0.5 * x * x) * INV_SQRT_2PI)


class SiLU(nn.Cell):
    """x * sigmoid(x), whose backward keeps only x: autodiff of MindSpore's SiLU keeps sigmoid(x) as well (one more
    activation-sized tensor per SiLU until the backward), torch keeps only the input. `fused` (default:
    cpu_kernels.enabled()): one CPU kernel each way, for fp32 (MindSpore's path is 2 passes forward, 5 backward),
    the backward kernel being the forward primitive's own bprop, so that Cell.recompute of an enclosing block
    (gradient checkpointing) recomputes x for it; a Cell bprop would read the first forward's. Otherwise
    HandWrittenSiLU."""

    def __init__(self, fused=None):
        super().__init__()
        self.fused = cpu_kernels.enabled() if fused is None else fused
        self.hand_written = HandWrittenSiLU()
        if self.fused:
            self.forward_kernel = cpu_kernels.kernel_with_backward("SiluForward", "SiluBackward")

    def add_flags(self, **flags):
        if cpu_kernels.lowers_precision(flags):
            self.fused = False
        return super().add_flags(**flags)

    def construct(self, x):
        if self.fused and x.dtype == ms.float32:
            return self.forward_kernel(x)
        return self.hand_written(x)


class HandWrittenSiLU(nn.Cell):
    """SiLU from MindSpore's ops, with a backward that recomputes sigmoid(x) after dout exists (the module's
    docstring: why the input waits for dout)."""

    def construct(self, x):
        return ops.silu(x)

    def bprop(self, x, out, dout):
        dout = dout.astype(x.dtype)
        x = ops.depend(x, dout)  # see the module's docstring
        sigmoid = ops.sigmoid(x)
        return (dout * sigmoid * (1.0 + x * (1.0 - sigmoid)),)

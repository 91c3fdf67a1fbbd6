"""MindSpore-op forms written around the per-kernel buffers of MindSpore 2.10's CPU kernels in GRAPH mode: an Add with
a broadcast operand, Transpose, exact GELU from a 0-d Tensor, and the softmax backward each hold several times their
output for as long as the graph exists (docs/performance.md, "Lean ops for MindSpore's CPU buffers"). The results are
the same to float rounding.

The backward passes below recompute what they need from their input, and that input waits for the incoming gradient
(ops.depend): otherwise GRAPH mode merges the recomputation with the forward's (common-subexpression elimination) or
runs it during the forward, and its results stay alive until the backward, which is what recomputing avoids.
"""
from mindspore import mint, nn, ops


SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def add_broadcast(x, y):
    """x + y where y broadcasts to x's shape (e.g. a (B, C, 1, 1) embedding onto (B, C, H, W))."""
    return x + ops.broadcast_to(y, x.shape)


def swap_axes(x, axis0: int, axis1: int):
    """x with two axes swapped, by mint.transpose: no per-kernel buffer (ops.Transpose keeps 2x its output), but
    slower; where a MatMul follows, prefer its transpose flags."""
    return mint.transpose(x, axis0, axis1)


def softmax_backward(probabilities, grad_probabilities):
    """The input gradient of y = softmax(x) along the last axis: y * dout - y * sum(y * dout), with no broadcast Sub.
    The row sums, and their spreading back over each row, are MatMuls with a column and a row of ones: MindSpore's CPU
    ReduceSum over the last axis and BroadcastTo are slow at attention sizes, and a Mul by a (..., 1) operand holds
    4x its output per op in GRAPH mode."""
    weighted = probabilities * grad_probabilities
    tokens = weighted.shape[-1]
    row_sums = ops.matmul(weighted, ops.ones((tokens, 1), weighted.dtype))
    return weighted - probabilities * ops.matmul(row_sums, ops.ones((1, tokens), weighted.dtype))


class LeanGELU(nn.GELU):
    """Exact (erf) GELU, x * Phi(x), from Python-float constants, with its own backward
    dout * (Phi(x) + x * phi(x)) that keeps only x: the CPU form of nn.GELU(approximate=False)."""

    def init_kernels(self):
        pass

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

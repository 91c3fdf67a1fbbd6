"""The CPU backend's attention and GEGLU gating: the fused kernels, or, where the library has no oneDNN, MindSpore ops
with a backward that recomputes the probabilities instead of keeping them (heads x tokens^2 per sample)."""
import mindspore as ms
from mindspore import nn, ops

from gm.backends.cpu import kernels
from gm.backends.cpu.lean_ops import softmax_backward
from gm.modules.attention import GatedGELU, SwapAxes12, VanillaAttention


def _three_like_the_inputs(q, k, v, *rest):
    return q, k, v


class FusedAttention(VanillaAttention):
    """softmax(q k^T * scale) v per head on (batch, tokens, heads * dim_head), forward and backward each one kernel
    (kernels/attention.cc): no head transposes, no tokens^2 tensors between kernels; the backward recomputes the
    probabilities block by block. Computes in fp32 whatever dtype the inputs arrive in."""

    def init_kernels(self):
        self.config = ms.Tensor([self.heads, self.scale], ms.float32)
        backward = kernels.kernel("AttentionBackward", _three_like_the_inputs, _three_like_the_inputs)

        def attention_bprop(q, k, v, config, out, dout):
            dq, dk, dv = backward(q, k, v, dout, config)
            return dq, dk, dv, ops.zeros_like(config)

        self.forward = kernels.kernel("AttentionForward", kernels.same_as_first, kernels.same_as_first,
                                      bprop=attention_bprop)

    def construct(self, q, k, v):
        out = self.forward(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), self.config)
        return out.astype(q.dtype)


class ScaledDotProductAttention(nn.Cell):
    """softmax(q k^T * scale) v over (batch, heads, tokens, dim_head), whose backward recomputes the probabilities
    from q and k, as flash attention does. Every transpose sits inside BatchMatMul's flags."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.softmax = ops.Softmax(axis=-1)
        self.matmul = ops.BatchMatMul()
        self.matmul_transposed_b = ops.BatchMatMul(transpose_b=True)
        self.matmul_transposed_a = ops.BatchMatMul(transpose_a=True)

    def construct(self, q, k, v):
        probabilities = self.softmax(self.matmul_transposed_b(q * self.scale, k))
        return self.matmul(probabilities, v)

    def bprop(self, q, k, v, out, dout):
        dout = dout.astype(v.dtype)
        # Recomputed from a q that waits for dout (lean_ops' docstring: otherwise the probabilities stay alive).
        scaled_q = ops.depend(q, dout) * self.scale
        probabilities = self.softmax(self.matmul_transposed_b(scaled_q, k))
        grad_v = self.matmul_transposed_a(probabilities, dout)
        grad_scores = softmax_backward(probabilities, self.matmul_transposed_b(dout, v))
        grad_q = self.matmul(grad_scores, k) * self.scale
        grad_k = self.matmul_transposed_a(grad_scores, scaled_q)
        return grad_q, grad_k, grad_v


class LeanAttention(VanillaAttention):
    """VanillaAttention by ScaledDotProductAttention, the heads split by the swap kernel, in fp32."""

    def init_kernels(self):
        self.core = ScaledDotProductAttention(self.scale)
        self.swap_axes = KernelSwapAxes12()
        self.swap_axes.init_kernels()

    def _split_heads(self, x):
        batch, tokens, _ = x.shape
        return self.swap_axes(x.astype(ms.float32).reshape(batch, tokens, self.heads, -1))

    def construct(self, q, k, v):
        dtype = q.dtype
        out = self.core(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        batch, _, tokens, _ = out.shape
        return self.swap_axes(out).reshape(batch, tokens, -1).astype(dtype)


def _middle_axes_swapped(shape):
    return [shape[0], shape[2], shape[1], *shape[3:]]


class KernelSwapAxes12(SwapAxes12):
    """Axes 1 and 2 swapped by one copy kernel each way (fp32)."""

    def init_kernels(self):
        self.kernel = kernels.kernel("SwapAxes12", _middle_axes_swapped, kernels.same_as_first)

    def construct(self, x):
        return self.kernel(x.astype(ms.float32)).astype(x.dtype)

    def bprop(self, x, out, dout):
        return (self.kernel(dout.astype(ms.float32)).astype(x.dtype),)


def _half_last_axis(x):
    return [*x[:-1], x[-1] // 2]


class KernelGatedGELU(GatedGELU):
    """value * gelu(gate) in one kernel each way (fp32); the backward keeps only the input. It is the primitive's own
    bprop, so that Cell.recompute of the enclosing block (gradient checkpointing) recomputes the input too."""

    def init_kernels(self):
        self.forward_kernel = kernels.kernel_with_backward("GatedGeluForward", "GatedGeluBackward", _half_last_axis)

    def construct(self, x):
        return self.forward_kernel(x.astype(ms.float32)).astype(x.dtype)

"""The CPU backend's forms of the UNet's SiLU, upsampling and ResBlock time-embedding add, and of the frozen Dense
layers on low-precision weights."""
import mindspore as ms
from mindspore import nn, ops

from gm.backends.cpu import kernels
from gm.backends.cpu.lean_ops import add_broadcast
from gm.backends.cpu.weight_cast import CastLike
from gm.modules.diffusionmodules.openaimodel import NearestUpsample2x, ResBlock
from gm.modules.frozen_weights import FrozenDense


class KernelSiLU(nn.SiLU):
    """x * sigmoid(x) in one kernel each way (fp32), whose backward keeps only x (autodiff of MindSpore's SiLU keeps
    sigmoid(x) too). The backward kernel is the forward primitive's own bprop, so that Cell.recompute of an enclosing
    block (gradient checkpointing) recomputes x for it."""

    def init_kernels(self):
        self.forward_kernel = kernels.kernel_with_backward("SiluForward", "SiluBackward")

    def construct(self, x):
        return self.forward_kernel(x.astype(ms.float32)).astype(x.dtype)


def _doubled_sides(x):
    return [x[0], x[1], 2 * x[2], 2 * x[3]]


def _halved_sides(dy):
    return [dy[0], dy[1], dy[2] // 2, dy[3] // 2]


class KernelUpsample2x(NearestUpsample2x):
    """Nearest x2 upsampling and its backward (a sum over 2x2 blocks), one kernel each way (fp32)."""

    def init_kernels(self):
        self.forward = kernels.kernel("Upsample2xNearest", _doubled_sides, kernels.same_as_first)
        self.backward = kernels.kernel("Upsample2xNearestBackward", _halved_sides, kernels.same_as_first)

    def construct(self, x):
        return self.forward(x.astype(ms.float32)).astype(x.dtype)

    def bprop(self, x, out, dout):
        return (self.backward(dout.astype(ms.float32)).astype(x.dtype),)


class LeanResBlock(ResBlock):
    """ResBlock whose time-embedding add broadcasts explicitly (lean_ops.add_broadcast)."""

    def init_kernels(self):
        pass

    def add_embedding(self, h, emb_out):
        return add_broadcast(h, emb_out[:, :, None, None])


def _dense_shape(x, weight, *bias):
    return [x[0], weight[0]]


def _dense_input_gradient_shape(dout, weight):
    return [dout[0], weight[1]]


class CastMatMul(nn.Cell):
    """x (N, in) @ weight(out, in).T with a frozen weight cast to x's dtype (CastLike: after x, never kept); the
    backward recasts it instead of autodiff keeping the cast copy. With oneDNN, an fp16 weight with fp32 x goes to the
    Dense kernels (kernels/dense.cc), which convert it a block at a time while multiplying."""

    def __init__(self):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.matmul_back = ops.MatMul()
        self.cast_like = CastLike()
        self.fused = kernels.has_onednn()
        if self.fused:
            self.forward_kernel = kernels.kernel("DenseForward", _dense_shape, kernels.same_as_first)
            self.input_gradient_kernel = kernels.kernel(
                "DenseBackwardData", _dense_input_gradient_shape, kernels.same_as_first)

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


def cast_matmul_for(layer) -> CastMatMul:
    return CastMatMulBias() if layer.has_bias else CastMatMul()


class KernelFrozenDense(FrozenDense):
    """FrozenDense by CastMatMul."""

    def init_kernels(self):
        self.cast_matmul = cast_matmul_for(self)

    def construct(self, x):
        x_shape = x.shape
        x_2d = x.reshape(-1, x_shape[-1])
        out = self.cast_matmul(x_2d, self.weight, self.bias) if self.has_bias else self.cast_matmul(x_2d, self.weight)
        return out.reshape(x_shape[:-1] + (out.shape[-1],))

"""GroupNorm and LayerNorm computed by the fused CPU kernels; their backward keeps only the input and recomputes the
statistics."""
import mindspore as ms
from mindspore import nn, ops

from gm.backends.cpu import kernels


def _input_and_two_parameters(x, gamma, *rest):
    return x, gamma, gamma


class NormKernel(nn.Cell):
    """forward(x, gamma, beta, config) -> y; backward(x, gamma, dy, config) -> (dx, dgamma, dbeta). The backward is
    the primitive's own (not a Cell bprop), so that Cell.recompute of an enclosing block recomputes its x too."""

    def __init__(self, forward: str, backward: str):
        super().__init__()
        backward_kernel = kernels.kernel(backward, _input_and_two_parameters, _input_and_two_parameters)

        def norm_bprop(x, gamma, beta, config, out, dout):
            dx, dgamma, dbeta = backward_kernel(x, gamma, dout.astype(x.dtype), config)
            return dx, dgamma, dbeta, ops.zeros_like(config)

        self.forward = kernels.kernel(forward, kernels.same_as_first, kernels.same_as_first, bprop=norm_bprop)

    def construct(self, x, gamma, beta, config):
        return self.forward(x, gamma, beta, config)


class KernelGroupNorm(nn.GroupNorm):
    """nn.GroupNorm over (N, C, *spatial), by the kernel for fp32 input."""

    def init_kernels(self):
        self.config = ms.Tensor([self.num_groups, self.eps], ms.float32)
        self.kernel = NormKernel("GroupNormForward", "GroupNormBackward")

    def construct(self, x):
        if x.dtype != ms.float32:
            return self._cal_output(x)
        return self.kernel(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype), self.config)


class KernelLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis, by the kernel for fp32 input."""

    def init_kernels(self):
        self.config = ms.Tensor([self.epsilon], ms.float32)
        self.kernel = NormKernel("LayerNormForward", "LayerNormBackward")

    def construct(self, x):
        gamma, beta = self.gamma.astype(x.dtype), self.beta.astype(x.dtype)
        if x.dtype != ms.float32:
            return self.layer_norm(x, gamma, beta)[0]
        return self.kernel(x, gamma, beta, self.config)


def normalizes_last_axis(norm: nn.LayerNorm) -> bool:
    """Whether the LayerNorm kernel applies: one normalised axis, the last (as every LayerNorm of SDXL)."""
    return len(norm.normalized_shape) == 1 and norm.begin_norm_axis == -1

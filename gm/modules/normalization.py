"""GroupNorm and LayerNorm: MindSpore's layers (same parameters and names, so checkpoints load as before), computed
by the fused CPU kernels of gm/modules/cpu_kernels where MindSpore runs on the CPU. Their backward keeps only the
input and recomputes the statistics."""
import mindspore as ms
from mindspore import nn, ops

from gm.modules import cpu_kernels


def _input_and_two_parameters(x, gamma, *rest):
    return x, gamma, gamma


class NormKernel(nn.Cell):
    """forward(x, gamma, beta, config) -> y; backward(x, gamma, dy, config) -> (dx, dgamma, dbeta). The backward is
    the primitive's own (not a Cell bprop), so that Cell.recompute of an enclosing block recomputes its x too."""

    def __init__(self, forward: str, backward: str):
        super().__init__()
        backward_kernel = cpu_kernels.kernel(backward, _input_and_two_parameters, _input_and_two_parameters)

        def norm_bprop(x, gamma, beta, config, out, dout):
            dx, dgamma, dbeta = backward_kernel(x, gamma, dout.astype(x.dtype), config)
            return dx, dgamma, dbeta, ops.zeros_like(config)

        self.forward = cpu_kernels.kernel(forward, cpu_kernels.same_as_first, cpu_kernels.same_as_first, bprop=norm_bprop)

    def construct(self, x, gamma, beta, config):
        return self.forward(x, gamma, beta, config)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm over (N, C, *spatial); `fused` (default: cpu_kernels.enabled()) picks the CPU kernel."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, fused=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.fused = cpu_kernels.enabled() if fused is None else fused
        if self.fused:
            self.config = ms.Tensor([num_groups, eps], ms.float32)
            self.kernel = NormKernel("GroupNormForward", "GroupNormBackward")

    def construct(self, x):
        if not self.fused or x.dtype != ms.float32:
            return self._cal_output(x)
        return self.kernel(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype), self.config)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis; `fused` (default: cpu_kernels.enabled()) picks the CPU kernel."""

    def __init__(self, normalized_shape, epsilon: float = 1e-5, fused=None):
        super().__init__(normalized_shape, epsilon=epsilon)
        if len(normalized_shape) != 1:
            raise ValueError(f"LayerNorm normalises the last axis only; got normalized_shape={normalized_shape}")
        self.fused = cpu_kernels.enabled() if fused is None else fused
        if self.fused:
            self.config = ms.Tensor([epsilon], ms.float32)
            self.kernel = NormKernel("LayerNormForward", "LayerNormBackward")

    def construct(self, x):
        gamma, beta = self.gamma.astype(x.dtype), self.beta.astype(x.dtype)
        if not self.fused or x.dtype != ms.float32:
            return self.layer_norm(x, gamma, beta)[0]
        return self.kernel(x, gamma, beta, self.config)

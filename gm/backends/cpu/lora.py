"""The CPU backend's LoRA layers: each low-rank branch one kernel each way (kernels/lora.cc), whose backward writes dx,
dA and dB together, so that the LoRA weight gradients run with their layer's backward instead of at the end of the
backward pass (which kept every layer's input and output gradient alive until then); a frozen base weight stored in
fp16/bf16 multiplies through CastMatMul."""
import mindspore as ms
from mindspore import ops

from gm.backends.cpu import kernels
from gm.backends.cpu.layers import cast_matmul_for
from gm.modules.lora import LoRABranch, LoRADense


def _lora_output_shape(x, lora_A, lora_B, config):
    return [x[0], lora_B[0]]


def _like_x_and_the_weights(x, lora_A, lora_B, *rest):
    return x, lora_A, lora_B


class KernelLoRABranch(LoRABranch):
    """The LoRA branch by the kernel where the library has oneDNN and the branch has no dropout."""

    def init_kernels(self):
        self.fused = kernels.has_onednn() and self.dropout == 0
        if self.fused:
            self.config = ms.Tensor([self.scale], ms.float32)
            backward = kernels.kernel("LoRABackward", _like_x_and_the_weights, _like_x_and_the_weights)

            def lora_bprop(x, lora_A, lora_B, config, out, dout):
                dx, d_lora_A, d_lora_B = backward(x, lora_A, lora_B, dout.astype(x.dtype), config)
                return dx, d_lora_A, d_lora_B, ops.zeros_like(config)

            self.kernel = kernels.kernel("LoRAForward", _lora_output_shape, kernels.same_as_first, bprop=lora_bprop)

    def low_rank_update(self, x):
        if self.fused and x.dtype == ms.float32 and self.lora_A.weight.dtype == ms.float32:
            # the kernel takes (rows, in); FusedQKVLoRA passes (batch, tokens, width)
            update = self.kernel(x.reshape(-1, x.shape[-1]), self.lora_A.weight, self.lora_B.weight, self.config)
            return update.reshape(x.shape[:-1] + (update.shape[-1],))
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return update if self.scale == 1.0 else update * self.scale


class KernelLoRADense(LoRADense, KernelLoRABranch):
    """LoRADense with the kernel branch; a base weight stored in another dtype than the input's through CastMatMul."""

    def init_kernels(self):
        KernelLoRABranch.init_kernels(self)
        self.cast_matmul = cast_matmul_for(self)

    def base_product(self, x_2d):
        if self.weight.dtype == x_2d.dtype:
            out = self.matmul(x_2d, self.weight)
            return self.bias_add(out, self.bias) if self.has_bias else out
        return self.cast_matmul(x_2d, self.weight, self.bias) if self.has_bias else self.cast_matmul(x_2d, self.weight)

"""The cast of a frozen weight stored in fp16/bf16 (gm/modules/frozen_weights.py) to the compute dtype."""
import mindspore as ms
from mindspore import nn, ops

from gm.modules import cpu_kernels


def _float32(*dtypes):
    return ms.float32


class CastLike(nn.Cell):
    """weight.astype(like.dtype), for frozen weights only (no gradient), computed after `like`: the fp32 copy of a
    weight is made where it is used (forward, then again in the backward), never kept in between.
    fp16 -> fp32 runs in the CPU kernel where cpu_kernels.enabled(): MindSpore's CPU Cast runs on one core
    (benchmarks/bench_op_cores.py). The kernel takes `like` as an input it does not read, for the order: an
    ops.depend on the weight made MindSpore load the parameter once more and copy it before each use (TensorMove,
    0.85 s of the full-size 512 train step)."""

    def __init__(self):
        super().__init__()
        self.fused = cpu_kernels.enabled()
        if self.fused:
            self.kernel = cpu_kernels.kernel("CastFloat16ToFloat32", cpu_kernels.same_as_first, _float32)

    def construct(self, weight, like):
        if self.fused and weight.dtype == ms.float16 and like.dtype == ms.float32:
            return self.kernel(weight, like)
        return ops.depend(weight, like).astype(like.dtype)

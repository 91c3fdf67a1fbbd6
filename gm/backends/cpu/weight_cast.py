"""The cast of a frozen weight stored in fp16/bf16 (gm/modules/frozen_weights.py) to the compute dtype, at its use."""
import mindspore as ms
from mindspore import nn, ops

from gm.backends.cpu import kernels


def _float32(*dtypes):
    return ms.float32


class CastLike(nn.Cell):
    """weight.astype(like.dtype), for frozen weights only (no gradient), computed after `like`: the fp32 copy of a
    weight is made where it is used (forward, then again in the backward), never kept in between. fp16 -> fp32 runs in
    the cast kernel (MindSpore's CPU Cast runs on one core). The kernel takes `like` as an input it does not read, for
    the order: an ops.depend on the weight made MindSpore load and copy the parameter once more before each use."""

    def __init__(self):
        super().__init__()
        self.kernel = kernels.kernel("CastFloat16ToFloat32", kernels.same_as_first, _float32)

    def construct(self, weight, like):
        if weight.dtype == ms.float16 and like.dtype == ms.float32:
            return self.kernel(weight, like)
        return ops.depend(weight, like).astype(like.dtype)

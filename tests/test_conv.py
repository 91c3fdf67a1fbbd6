"""The CPU backend's convolution (gm/backends/cpu/conv.py: im2col + MatMul, a frozen weight's own backward, the oneDNN
kernel) equals MindSpore's nn.Conv2d: output, input gradient and weight gradient, for SDXL's kernel/stride/padding
combinations, with and without strips, in both modes, and with the weight stored in fp16."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

import gm.backends.cpu.conv as conv_module
from gm.backends.cpu import apply as apply_cpu_backend
from gm.backends.cpu.conv import Conv2d
from gm.modules.diffusionmodules.util import conv2d
from gm.modules.frozen_weights import FrozenConv2d, store_frozen_weights
from gradients import Gradients
from test_unet import relative_error

# (in, out, kernel, stride, padding, height, width): UNet/VAE 3x3, UNet downsample (stride 2, padding 1),
# VAE downsample (stride 2, no padding, odd size after its own right/bottom pad), 1x1 projection.
CASES = [(4, 8, 3, 1, 1, 9, 7), (4, 8, 3, 2, 1, 9, 8), (4, 6, 3, 2, 0, 11, 11), (5, 3, 1, 1, 0, 6, 6)]


class SumOfSquares(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x):
        return (self.net(x) ** 2).sum()


def _output_and_grads(net, x):
    weights = ms.ParameterTuple([net.weight, net.bias])
    grad = ops.GradOperation(get_all=True, get_by_list=True)(SumOfSquares(net), weights)
    (grad_x,), (grad_weight, grad_bias) = grad(x)
    return [t.asnumpy() for t in (net(x), grad_x, grad_weight, grad_bias)]


def _in_cpu_backend(*convs):
    """The convs (plain nn.Conv2d, frozen or stored in fp16 as set beforehand) given their CPU backend form."""
    return apply_cpu_backend(nn.SequentialCell(list(convs)))


def _pair(case, rng):
    in_channels, out_channels, kernel, stride, padding, _, _ = case
    matmul = conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding)
    native = conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding)
    assert _in_cpu_backend(matmul) == 1 and isinstance(matmul, Conv2d) and not matmul.frozen_weight
    weight = rng.standard_normal(matmul.weight.shape).astype(np.float32)
    bias = rng.standard_normal(matmul.bias.shape).astype(np.float32)
    for net in (matmul, native):
        net.weight.set_data(ms.Tensor(weight))
        net.bias.set_data(ms.Tensor(bias))
    return matmul, native


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("max_columns_bytes", [None, 1500], ids=["whole", "strips"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[2]}s{c[3]}p{c[4]}")
def test_matmul_conv_equals_native_conv(case, max_columns_bytes, mode, monkeypatch):
    if max_columns_bytes:  # a few hundred columns per strip: several strips, the last one shorter
        monkeypatch.setattr(conv_module, "MAX_COLUMNS_BYTES", max_columns_bytes)
    rng = np.random.default_rng(0)
    matmul, native = _pair(case, rng)
    x = ms.Tensor(rng.standard_normal((2, case[0], case[5], case[6])).astype(np.float32))
    ms.set_context(mode=mode)
    try:
        got, want = _output_and_grads(matmul, x), _output_and_grads(native, x)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, want):
        assert a.shape == b.shape, name
        assert relative_error(a, b) < 1e-5, name


@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[2]}s{c[3]}p{c[4]}")
def test_frozen_weight_takes_its_own_backward_and_equals_autodiff(case, mode, storage):
    """A frozen weight, fp32 or stored in fp16 (store_frozen_weights): FrozenWeightConv's own backward (the kernel,
    or a fold of W^T dout) gives the input gradient autodiff gives the trainable fp32 conv."""
    in_channels, out_channels, kernel, stride, padding, height, width = case
    rng = np.random.default_rng(1)
    reference, stored = (conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding) for _ in range(2))
    weight = rng.standard_normal(reference.weight.shape).astype(np.float16).astype(np.float32)  # fp16-exact
    bias = np.linspace(-1, 1, out_channels).astype(np.float16).astype(np.float32)
    for net in (reference, stored):
        net.weight.set_data(ms.Tensor(weight))
        net.bias.set_data(ms.Tensor(bias))
        net.bias.requires_grad = net.weight.requires_grad = False
    reference.weight.requires_grad = True  # `reference` keeps the autodiff route
    if storage == "float16":
        assert store_frozen_weights(nn.SequentialCell([stored]), "float16") == 1
    assert _in_cpu_backend(stored, reference) == 2
    assert stored.frozen_weight and not reference.frozen_weight and stored.weight.dtype == getattr(ms, storage)
    x = ms.Tensor(rng.standard_normal((2, in_channels, height, width)).astype(np.float32))
    ms.set_context(mode=mode)
    try:
        got = [stored(x).asnumpy(), Gradients(SumOfSquares(stored))(x)[0].asnumpy()]
        want = [reference(x).asnumpy(), Gradients(SumOfSquares(reference))(x)[0].asnumpy()]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    for a, b in zip(got, want):
        assert a.shape == b.shape and relative_error(a, b) < 1e-6


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_fused_frozen_conv_is_never_cut_into_strips(storage, monkeypatch):
    """The oneDNN kernel makes no im2col columns: a frozen conv whose columns exceed MAX_COLUMNS_BYTES goes to it
    whole (no unfold at all) and gives what the strips give."""
    monkeypatch.setattr(conv_module, "MAX_COLUMNS_BYTES", 1500)
    rng = np.random.default_rng(2)
    strips, whole = (conv2d(8, 16, 3, padding=1) for _ in range(2))
    weight = rng.standard_normal(strips.weight.shape).astype(np.float16).astype(np.float32)
    bias = np.linspace(-1, 1, 16).astype(np.float16).astype(np.float32)
    for net in (strips, whole):
        net.weight.set_data(ms.Tensor(weight))
        net.bias.set_data(ms.Tensor(bias))
        net.bias.requires_grad = net.weight.requires_grad = False
    strips.weight.requires_grad = True
    if storage == "float16":
        assert store_frozen_weights(nn.SequentialCell([whole]), "float16") == 1
    _in_cpu_backend(whole, strips)
    assert whole.frozen_conv.fused
    x = ms.Tensor(rng.standard_normal((2, 8, 12, 10)).astype(np.float32))
    unfolded = []
    unfold = ops.unfold
    monkeypatch.setattr(ops, "unfold", lambda *args, **kwargs: unfolded.append(1) or unfold(*args, **kwargs))
    got = whole(x).asnumpy()
    assert not unfolded
    want = strips(x).asnumpy()
    assert len(unfolded) > 1  # the unfrozen conv went in strips
    assert relative_error(got, want) < 1e-5


def test_plain_conv_stored_in_fp16_casts_at_use():
    """The plain backend (Ascend/GPU): fp16 storage makes a FrozenConv2d, whose output equals the fp32 conv's."""
    rng = np.random.default_rng(3)
    fp32, fp16 = conv2d(4, 8, 3, padding=1), conv2d(4, 8, 3, padding=1)
    weight = rng.standard_normal(fp32.weight.shape).astype(np.float16).astype(np.float32)
    for net in (fp32, fp16):
        net.weight.set_data(ms.Tensor(weight))
        net.bias.set_data(ms.Tensor(np.zeros(8, np.float32)))
    fp16.weight.requires_grad = fp16.bias.requires_grad = False
    holder = nn.SequentialCell([fp16])
    store_frozen_weights(holder, "float16")
    assert isinstance(holder[0], FrozenConv2d) and holder[0].weight.dtype == ms.float16
    x = ms.Tensor(rng.standard_normal((1, 4, 6, 6)).astype(np.float32))
    assert relative_error(holder[0](x).asnumpy(), fp32(x).asnumpy()) < 1e-6

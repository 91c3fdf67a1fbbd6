"""gm/backends/cpu/kernels: the fused CPU kernels equal torch (outputs and every gradient), are built once into the
cache without leaving partial files, are what the CPU backend's forms of the plain gm layers use on this CPU, and
decide whether `auto` picks the CPU backend at all."""
import ctypes
import logging
import os

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mindspore import nn

import gm.backends
import gm.backends.cpu
from gm.backends.cpu import kernels
from gm.backends.cpu.attention import FusedAttention, KernelGatedGELU, KernelSwapAxes12, LeanAttention
from gm.backends.cpu.conv import Conv2d, FrozenWeightConv
from gm.backends.cpu.layers import KernelFrozenDense, KernelSiLU, KernelUpsample2x
from gm.backends.cpu.lora import KernelLoRABranch
from gm.backends.cpu.norms import KernelGroupNorm, KernelLayerNorm
from gm.backends.cpu.weight_cast import CastLike
from gm.modules.attention import CrossAttention, GatedGELU, SwapAxes12, VanillaAttention
from gm.modules.diffusionmodules.openaimodel import NearestUpsample2x
from gm.modules.diffusionmodules.util import conv2d
from gm.modules.frozen_weights import FrozenDense
from gm.modules.lora import LoRABranch
from gm.util import become
from test_unet import relative_error

MODES = pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])


def cpu_form(cell, form=None):
    """`cell`, a plain gm layer, given its CPU form in place, as gm.backends.cpu.apply gives it inside a model (the
    same object, parameters and names); `form`: the class it must then be."""
    gm.backends.cpu.apply(nn.SequentialCell([cell]))
    if form is not None:
        assert type(cell) is form, f"{type(cell).__name__} is not {form.__name__}"
    return cell


class WeightedSum(nn.Cell):
    def __init__(self, net, weights):
        super().__init__()
        self.net, self.weights = net, weights

    def construct(self, x):
        return (self.net(x) * self.weights).sum()


def _ours(net, x, weights, mode):
    """net(x), and the gradients of sum(net(x) * weights) for x and net's trainable parameters."""
    ms.set_context(mode=mode)
    try:
        out = net(ms.Tensor(x)).asnumpy()
        grad = ms.value_and_grad(WeightedSum(net, ms.Tensor(weights)), grad_position=0, weights=net.trainable_params())
        _, (grad_x, grad_params) = grad(ms.Tensor(x))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    return out, [grad_x.asnumpy(), *(g.asnumpy() for g in grad_params)]


def _torch(fn, x, params, weights):
    tensors = [torch.from_numpy(a).requires_grad_(True) for a in (x, *params)]
    out = fn(*tensors)
    (out * torch.from_numpy(weights)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def _assert_close(got, want, tolerance=1e-5):
    (out, grads), (want_out, want_grads) = got, want
    assert out.shape == want_out.shape and relative_error(out, want_out) <= tolerance
    assert len(grads) == len(want_grads)
    for index, (a, b) in enumerate(zip(grads, want_grads)):
        assert a.shape == b.shape and relative_error(a, b) <= tolerance, f"gradient {index}: {relative_error(a, b)}"


def _affine(net, rng):
    params = (rng.uniform(0.5, 1.5, net.gamma.shape).astype(np.float32), rng.standard_normal(net.beta.shape).astype(np.float32))
    net.gamma.set_data(ms.Tensor(params[0]))
    net.beta.set_data(ms.Tensor(params[1]))
    return params


def test_the_kernels_are_built_and_used_on_this_cpu():
    """CI's machines have g++ and oneDNN's headers: the CPU backend, with every kernel, is what `auto` gives here,
    and what the tests (and the quick-start) run."""
    assert kernels.available() and kernels.has_onednn()
    assert gm.backends.resolve_backend("auto") == "cpu" and gm.backends.resolve_backend("cpu") == "cpu"
    cpu_form(nn.GroupNorm(32, 64), KernelGroupNorm)
    cpu_form(nn.LayerNorm((16,)), KernelLayerNorm)
    cpu_form(GatedGELU(), KernelGatedGELU)
    cpu_form(SwapAxes12(), KernelSwapAxes12)
    cpu_form(nn.SiLU(), KernelSiLU)
    cpu_form(NearestUpsample2x(), KernelUpsample2x)
    assert cpu_form(LoRABranch(16, 16, 4, 4), KernelLoRABranch).fused
    assert FrozenWeightConv(3, 1, 1).fused
    attention = CrossAttention(32, heads=2, dim_head=16)
    gm.backends.apply_backend(attention, "auto")
    assert type(attention.attention) is FusedAttention
    assert isinstance(CastLike().kernel, ms.ops.Custom)


def test_the_backend_is_chosen_by_whether_the_kernels_build(monkeypatch):
    """What the removed MINDBOOTH_CPU_KERNELS switch decided is now the backend: `auto` takes the CPU backend where its
    kernels build and the plain model (MindSpore's ops, as on Ascend/GPU) where they do not; asking for `cpu` there is
    an error, and apply_backend leaves the plain layers as they are."""
    assert gm.backends.resolve_backend("auto") == "cpu"
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert not gm.backends.cpu.available()
    assert gm.backends.resolve_backend("auto") == "plain" and gm.backends.resolve_backend("plain") == "plain"
    with pytest.raises(ValueError, match="did not build"):
        gm.backends.resolve_backend("cpu")
    net = nn.SequentialCell([nn.GroupNorm(32, 64), nn.LayerNorm((16,)), GatedGELU()])
    assert gm.backends.apply_backend(net, "auto") == "plain"
    assert [type(cell) for cell in net] == [nn.GroupNorm, nn.LayerNorm, GatedGELU]
    with pytest.raises(ValueError):
        gm.backends.apply_backend(net, "cpu")


@MODES
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (1, 96, 3, 5), (2, 32, 7)], ids=["4d", "odd-pixels", "3d"])
def test_group_norm_equals_torch(shape, mode):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)  # an offset mean: the variance must not cancel
    weights = rng.standard_normal(shape).astype(np.float32)
    net = cpu_form(nn.GroupNorm(32, shape[1], eps=1e-6), KernelGroupNorm)
    gamma, beta = _affine(net, rng)
    want = _torch(lambda x, g, b: F.group_norm(x, 32, g, b, eps=1e-6), x, (gamma, beta), weights)
    _assert_close(_ours(net, x, weights, mode), want)


@MODES
@pytest.mark.parametrize("shape", [(2, 16, 40), (3, 77, 24), (5, 13)], ids=["tokens", "text", "2d-odd"])
def test_layer_norm_equals_torch(shape, mode):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 - 1).astype(np.float32)
    weights = rng.standard_normal(shape).astype(np.float32)
    net = cpu_form(nn.LayerNorm((shape[-1],), epsilon=1e-5), KernelLayerNorm)
    gamma, beta = _affine(net, rng)
    want = _torch(lambda x, g, b: F.layer_norm(x, (shape[-1],), g, b, eps=1e-5), x, (gamma, beta), weights)
    _assert_close(_ours(net, x, weights, mode), want)


@MODES
@pytest.mark.parametrize("shape", [(2, 16, 2 * 40), (3, 2 * 13)], ids=["tokens", "2d-odd"])
def test_gated_gelu_equals_torch(shape, mode):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)  # gates well into both tails of erf
    weights = rng.standard_normal(shape[:-1] + (shape[-1] // 2,)).astype(np.float32)

    def reference(x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)

    net = cpu_form(GatedGELU(), KernelGatedGELU)
    _assert_close(_ours(net, x, weights, mode), _torch(reference, x, (), weights))


@MODES
def test_cpu_forms_and_plain_layers_agree(mode):
    """The same layers as the plain model has them (MindSpore's ops, as on Ascend/GPU or in the plain backend) compute
    the same numbers as their CPU forms, forward and backward."""
    rng = np.random.default_rng(3)
    for make, shape in ((lambda: nn.GroupNorm(32, 64), (2, 64, 4, 4)),
                        (lambda: nn.LayerNorm((24,)), (2, 9, 24)),
                        (lambda: GatedGELU(), (2, 9, 48))):
        x = rng.standard_normal(shape).astype(np.float32)
        fused, plain = cpu_form(make()), make()
        assert type(fused) is not type(plain) and isinstance(fused, type(plain))
        if hasattr(fused, "gamma"):
            gamma, beta = _affine(fused, rng)
            plain.gamma.set_data(ms.Tensor(gamma))
            plain.beta.set_data(ms.Tensor(beta))
        weights = rng.standard_normal(fused(ms.Tensor(x)).shape).astype(np.float32)
        _assert_close(_ours(fused, x, weights, mode), _ours(plain, x, weights, mode))


def test_fp16_cast_is_exact():
    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((37, 11)) * 100).astype(np.float16)  # 407 values: 8-wide vectors and a tail
    weight[0, :4] = [np.inf, -np.inf, 6.0e-8, -0.0]  # infinities, a subnormal, a signed zero
    like = ms.Tensor(np.zeros(1, np.float32))
    got = CastLike()(ms.Tensor(weight), like).asnumpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, weight.astype(np.float32))
    assert np.signbit(got[0, 3])


def test_unavailable_when_mindspore_would_refuse_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv("MS_CUSTOM_AOT_WHITE_LIST", str(tmp_path))  # MindSpore allows custom-op libraries only there
    assert not kernels.available() and not kernels.has_onednn()
    assert gm.backends.resolve_backend("auto") == "plain"
    monkeypatch.setenv("MS_CUSTOM_AOT_WHITE_LIST", os.path.dirname(kernels.library_path()))
    assert kernels.available()
    assert gm.backends.resolve_backend("auto") == "cpu"


def test_build_is_cached_and_leaves_no_partial_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDBOOTH_KERNEL_CACHE", str(tmp_path))
    kernels._library.cache_clear()
    try:
        path = kernels.library_path()
        assert path is not None and os.path.dirname(path) == str(tmp_path)
        assert os.listdir(tmp_path) == [os.path.basename(path)]  # the build folder is gone
        built = os.stat(path).st_mtime_ns
        kernels._library.cache_clear()
        assert kernels.library_path() == path and os.stat(path).st_mtime_ns == built  # not rebuilt
    finally:
        kernels._library.cache_clear()


def test_a_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MINDBOOTH_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert kernels.library_path() is None
            assert not kernels.available() and not kernels.has_onednn()
            assert gm.backends.resolve_backend("auto") == "plain"
        assert "using MindSpore's CPU kernels" in caplog.text
        assert os.listdir(tmp_path) == []
    finally:
        kernels._library.cache_clear()


@MODES
@pytest.mark.parametrize("shape", [(2, 37, 5, 8), (2, 40, 70), (1, 3, 33, 17, 2)], ids=["heads", "pixels", "5d"])
def test_swapping_axes_equals_torch(shape, mode):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    weights = rng.standard_normal(x.swapaxes(1, 2).shape).astype(np.float32)
    net = cpu_form(SwapAxes12(), KernelSwapAxes12)
    _assert_close(_ours(net, x, weights, mode), _torch(lambda x: x.transpose(1, 2), x, (), weights), tolerance=0)


class FrozenConvolution(nn.Cell):
    """A frozen weight (as every conv of a LoRA run) through FrozenWeightConv: only the input has a gradient."""

    def __init__(self, weight, padding, algorithm="auto"):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(weight), requires_grad=False)
        self.conv = FrozenWeightConv(weight.shape[-1], 1, padding, algorithm=algorithm)
        assert self.conv.fused  # the oneDNN kernel, which the CPU backend takes where the library has it

    def construct(self, x):
        return self.conv(x, self.weight)


@MODES
@pytest.mark.parametrize("storage", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [(5, 7, 3, 1, 9, 6), (6, 4, 3, 0, 8, 11), (5, 3, 1, 0, 6, 6), (16, 24, 3, 1, 12, 12),
                                  (4, 5, 3, 2, 7, 7)],
                         ids=["k3p1-odd", "k3p0", "k1", "k3p1-blocked", "k3p2"])
def test_convolution_equals_torch(case, storage, mode):
    """The oneDNN kernel: output and input gradient of a stride-1 conv, as torch computes them on the same weight."""
    in_channels, out_channels, kernel, padding, height, width = case
    rng = np.random.default_rng(6)
    weight = (rng.standard_normal((out_channels, in_channels, kernel, kernel)) / kernel).astype(storage)
    x = rng.standard_normal((2, in_channels, height, width)).astype(np.float32)
    net = FrozenConvolution(weight, padding)
    assert net.conv.fused and not net.trainable_params()
    weight_fp32 = torch.from_numpy(weight.astype(np.float32))
    grow = 2 * padding - kernel + 1
    weights = rng.standard_normal((2, out_channels, height + grow, width + grow)).astype(np.float32)
    want = _torch(lambda x: F.conv2d(x, weight_fp32, padding=padding), x, (), weights)
    _assert_close(_ours(net, x, weights, mode), want)


@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_convolution_splits_rows_or_images(batch):
    """The 1x1 convolution as one sgemm per image (conv.cc): with fewer images than threads each image's output rows
    are split between them, with more the images are; output and input gradient as torch computes them."""
    rng = np.random.default_rng(10)
    weight = rng.standard_normal((40, 24, 1, 1)).astype(np.float32)
    x = rng.standard_normal((batch, 24, 7, 5)).astype(np.float32)
    weights = rng.standard_normal((batch, 40, 7, 5)).astype(np.float32)
    want = _torch(lambda x: F.conv2d(x, torch.from_numpy(weight)), x, (), weights)
    _assert_close(_ours(FrozenConvolution(weight, 0), x, weights, ms.GRAPH_MODE), want)


@MODES
@pytest.mark.parametrize("storage", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [(8, 16, 2, 9, 7), (24, 8, 1, 13, 18), (64, 32, 2, 16, 16)],
                         ids=["tails", "one-sample", "whole-tiles"])
def test_winograd_convolution_is_as_close_to_exact_as_direct(case, storage, mode):
    """Winograd's F(4x4, 3x3) (winograd.cc): output and input gradient against the float64 convolution, within a
    small multiple of the direct convolution's fp32 error; sizes that are not whole 4x4 tiles or 8-column blocks."""
    in_channels, out_channels, batch, height, width = case
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((out_channels, in_channels, 3, 3)) / np.sqrt(9 * in_channels)).astype(storage)
    x = rng.standard_normal((batch, in_channels, height, width)).astype(np.float32)
    weights = rng.standard_normal((batch, out_channels, height, width)).astype(np.float32)
    exact = _torch(lambda x: F.conv2d(x, torch.from_numpy(weight.astype(np.float64)), padding=1), x.astype(np.float64),
                   (), weights.astype(np.float64))
    errors = {}
    for algorithm in ("direct", "winograd"):
        out, (grad_x,) = _ours(FrozenConvolution(weight, 1, algorithm=algorithm), x, weights, mode)
        errors[algorithm] = relative_error(out, exact[0]), relative_error(grad_x, exact[1][0])
    assert max(errors["winograd"]) <= 2e-5, errors
    assert errors["winograd"] != errors["direct"]  # a different algorithm ran


def test_winograd_is_taken_where_it_pays():
    """"auto" computes what Winograd computes where the batch has 32 or more 4x4 output tiles, else what the direct
    convolution computes; 1x1 convolutions and channel counts that are not multiples of 8 stay direct."""
    rng = np.random.default_rng(8)

    def outputs(in_channels, out_channels, kernel, batch, side):
        weight = rng.standard_normal((out_channels, in_channels, kernel, kernel)).astype(np.float32)
        x = ms.Tensor(rng.standard_normal((batch, in_channels, side, side)).astype(np.float32))
        return [FrozenConvolution(weight, kernel // 2, algorithm=a)(x).asnumpy() for a in ("auto", "direct", "winograd")]

    auto, direct, winograd = outputs(16, 16, 3, 2, 16)  # 2 x 16 tiles
    assert np.array_equal(auto, winograd) and not np.array_equal(auto, direct)
    auto, direct, winograd = outputs(16, 16, 3, 1, 16)  # 16 tiles
    assert np.array_equal(auto, direct) and not np.array_equal(auto, winograd)
    for shape in ((16, 16, 1, 2, 16), (12, 16, 3, 2, 16)):
        auto, direct, winograd = outputs(*shape)
        assert np.array_equal(auto, direct) and np.array_equal(winograd, direct)


def test_scratch_buffers_are_kept_and_reused():
    """The Winograd convolution's scratch buffers (scratch.cc) stay allocated between calls: a repeated call reuses
    them (no new bytes) and gives the same result; a larger call replaces the buffers it outgrew instead of adding
    to them; a smaller call after it takes what is kept."""
    kept_bytes = ctypes.CDLL(kernels.library_path()).MindBoothScratchKeptBytes
    kept_bytes.restype = ctypes.c_int64
    rng = np.random.default_rng(9)

    def convolution(channels):
        weight = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float16)
        x = ms.Tensor(rng.standard_normal((2, channels, 16, 16)).astype(np.float32))
        net = FrozenConvolution(weight, 1, algorithm="winograd")
        return lambda: net(x).asnumpy()

    small, large = convolution(256), convolution(384)
    large_filters_bytes = 36 * 384 * 384 * 4  # transformed filters, larger than any buffer this file used before
    first = small()
    kept = kept_bytes()
    assert kept >= 36 * 256 * 256 * 4
    assert np.array_equal(small(), first) and kept_bytes() == kept
    large()
    grown = kept_bytes()
    assert large_filters_bytes <= grown < kept + large_filters_bytes  # added on top, it would be more
    assert np.array_equal(small(), first) and kept_bytes() == grown


@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_fp16_weights_are_read_as_stored(algorithm):
    """An fp16 weight goes to the kernel as stored (no CastLike copy in between) and gives, forward and backward,
    exactly what its fp32 values give."""
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float16)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    weights = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    stored = FrozenConvolution(weight, 1, algorithm=algorithm)
    calls = []
    stored.conv.hand_written.cast_like.construct = lambda *args: calls.append(args)  # any cast would fail the call
    got = _ours(stored, x, weights, ms.PYNATIVE_MODE)
    want = _ours(FrozenConvolution(weight.astype(np.float32), 1, algorithm=algorithm), x, weights, ms.PYNATIVE_MODE)
    assert not calls
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1][0], want[1][0])


def _frozen_dense(weight, bias, form=True):
    """A FrozenDense holding the fp16 `weight` (out, in) and `bias` (or None), as store_frozen_weights leaves a frozen
    nn.Dense; given its CPU form (KernelFrozenDense) unless `form` is False."""
    base = nn.Dense(weight.shape[1], weight.shape[0], has_bias=bias is not None)
    for parameter, value in ((base.weight, weight), (base.bias, bias)):
        if value is not None:
            parameter.set_dtype(ms.float16)
            parameter.set_data(ms.Tensor(value))
            parameter.requires_grad = False
    become(base, FrozenDense)
    return cpu_form(base, KernelFrozenDense) if form else base


@MODES
@pytest.mark.parametrize("case", [((2, 3, 24), 13, True), ((5, 16), 40, False), ((2, 550, 40), 600, True)],
                         ids=["bias-odd-columns", "no-bias", "row-chunks-column-blocks"])
def test_frozen_dense_kernel_equals_torch(case, mode):
    """The Dense kernel (dense.cc) on an fp16-stored frozen weight and bias, read as stored (no cast kernel runs):
    output and input gradient as torch computes them on the same values in fp32. 1100 rows and 600 columns take
    several row chunks and column blocks per thread."""
    x_shape, out_features, has_bias = case
    rng = np.random.default_rng(11)
    weight = (rng.standard_normal((out_features, x_shape[-1])) / np.sqrt(x_shape[-1])).astype(np.float16)
    bias = rng.standard_normal(out_features).astype(np.float16) if has_bias else None
    x = rng.standard_normal(x_shape).astype(np.float32)
    weights = rng.standard_normal((*x_shape[:-1], out_features)).astype(np.float32)
    net = _frozen_dense(weight, bias)
    assert net.cast_matmul.fused and not net.trainable_params()
    casts = []
    if mode == ms.PYNATIVE_MODE:  # any cast would fail the call (GRAPH mode would parse the stand-in)
        net.cast_matmul.cast_like.construct = lambda *args: casts.append(args)
    weight_fp32 = torch.from_numpy(weight.astype(np.float32))
    bias_fp32 = torch.from_numpy(bias.astype(np.float32)) if has_bias else None
    want = _torch(lambda x: F.linear(x, weight_fp32, bias_fp32), x, (), weights)
    _assert_close(_ours(net, x, weights, mode), want)
    assert not casts


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
def test_frozen_dense_kernel_and_mindspore_ops_compute_what_the_plain_layer_does(has_bias):
    """The CPU form's kernel, its MindSpore path (cast, MatMul, BiasAdd: where the library has no oneDNN) and the
    plain FrozenDense give the same output and input gradient."""
    rng = np.random.default_rng(12)
    weight = rng.standard_normal((24, 16)).astype(np.float16)
    bias = rng.standard_normal(24).astype(np.float16) if has_bias else None
    x = rng.standard_normal((7, 16)).astype(np.float32)
    weights = rng.standard_normal((7, 24)).astype(np.float32)
    fused, ops_form, plain = _frozen_dense(weight, bias), _frozen_dense(weight, bias), _frozen_dense(weight, bias, False)
    ops_form.cast_matmul.fused = False
    assert type(plain) is FrozenDense
    want = _ours(plain, x, weights, ms.GRAPH_MODE)
    _assert_close(_ours(fused, x, weights, ms.GRAPH_MODE), want)
    _assert_close(_ours(ops_form, x, weights, ms.GRAPH_MODE), want)


def test_convolution_kernel_takes_the_stride_one_convolutions():
    """The UNet's downsamplers (stride 2) keep im2col; the 3x3 and 1x1 convolutions of frozen weights take the
    kernel."""
    net = nn.SequentialCell([conv2d(4, 8, 3, padding=1), conv2d(8, 8, 3, stride=2, padding=1), conv2d(8, 4, 1)])
    for parameter in net.get_parameters():
        parameter.requires_grad = False
    assert gm.backends.cpu.apply(net) == 3
    assert all(type(cell) is Conv2d and cell.frozen_weight for cell in net)
    assert [cell.frozen_conv.fused for cell in net] == [True, False, True]


@pytest.mark.parametrize("headers", ["missing", "broken"])
def test_without_onednn_the_other_kernels_stay(headers, tmp_path, monkeypatch, caplog):
    """No oneDNN headers, or headers that do not compile: the library is built without the convolution (one
    library in the cache, no partial files), the other kernels are still used, and the layers whose kernels need
    oneDNN take their MindSpore-op forms (attention: LeanAttention), which compute what the plain layers do."""
    monkeypatch.setenv("MINDBOOTH_KERNEL_CACHE", str(tmp_path / "cache"))
    if headers == "missing":
        monkeypatch.setattr(kernels, "onednn_paths", lambda: None)
    else:
        broken = tmp_path / "include" / "oneapi" / "dnnl"
        broken.mkdir(parents=True)
        (broken / "dnnl.h").write_text("#error not oneDNN\n")
        library_folder = kernels.onednn_paths()[1]
        monkeypatch.setattr(kernels, "onednn_paths", lambda: (tmp_path / "include", library_folder))
    kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            path = kernels.library_path()
            assert path is not None and kernels.available() and not kernels.has_onednn()
        assert gm.backends.resolve_backend("auto") == "cpu"
        assert not FrozenWeightConv(3, 1, 1).fused
        norm = cpu_form(nn.GroupNorm(32, 64), KernelGroupNorm)
        attention = cpu_form(VanillaAttention(2, 8**-0.5), LeanAttention)
        assert not cpu_form(LoRABranch(16, 16, 4, 4), KernelLoRABranch).fused
        assert not _frozen_dense(np.ones((8, 4), np.float16), None).cast_matmul.fused
        assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]
        assert ("build with oneDNN failed" in caplog.text) == (headers == "broken")
        # ... and they run, from the library without oneDNN
        rng = np.random.default_rng(15)
        x = ms.Tensor(rng.standard_normal((2, 64, 3, 3)).astype(np.float32))
        want = nn.GroupNorm(32, 64)(x).asnumpy()
        assert relative_error(norm(x).asnumpy(), want) < 1e-5
        q, k, v = (ms.Tensor(rng.standard_normal((2, 5, 16)).astype(np.float32)) for _ in range(3))
        want = VanillaAttention(2, 8**-0.5)(q, k, v).asnumpy()
        assert relative_error(attention(q, k, v).asnumpy(), want) < 1e-5
    finally:
        kernels._library.cache_clear()


class Attention(nn.Cell):
    def __init__(self, heads, dim_head, k, v):
        super().__init__()
        self.attention = cpu_form(VanillaAttention(heads, dim_head**-0.5), FusedAttention)
        self.k, self.v = ms.Parameter(ms.Tensor(k), name="k"), ms.Parameter(ms.Tensor(v), name="v")

    def construct(self, q):
        return self.attention(q, self.k, self.v)


@MODES
@pytest.mark.parametrize("case", [(2, 70, 77, 3, 8, 1), (1, 130, 130, 2, 16, 1), (2, 64, 5, 4, 8, 1),
                                  (1, 101, 541, 2, 64, 1), (2, 53, 77, 2, 32, 8)],
                         ids=["cross", "self-odd-blocks", "few-keys", "flash-key-blocks", "flash-peaked"])
def test_fused_attention_equals_torch(case, mode):
    """softmax(q k^T / sqrt(d)) v per head on (batch, tokens, heads * dim_head): output and the gradients of q, k
    and v (k and v as parameters here), as torch's scaled_dot_product_attention computes them. dim_head 16, 32 and
    64 take the flash forward: 541 keys are three key blocks (the last one partial, as 77's single one) and 101
    queries three query blocks; q at 8x spreads the scores over hundreds, so later blocks' maxima rescale earlier
    ones and most probabilities underflow."""
    batch, queries, keys, heads, dim_head, q_scale = case
    rng = np.random.default_rng(7)
    q = q_scale * rng.standard_normal((batch, queries, heads * dim_head)).astype(np.float32)
    k, v = (rng.standard_normal((batch, keys, heads * dim_head)).astype(np.float32) for _ in range(2))
    weights = rng.standard_normal(q.shape).astype(np.float32)

    def reference(q, k, v):
        split = lambda t: t.reshape(batch, t.shape[1], heads, dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(batch, queries, heads * dim_head)

    _assert_close(_ours(Attention(heads, dim_head, k, v), q, weights, mode), _torch(reference, q, (k, v), weights))


@MODES
@pytest.mark.parametrize("case", [(300, 40, 24, 4, 4.0), (7, 16, 33, 2, 1.0), (77, 64, 48, 8, 16.0)],
                         ids=["row-chunks", "one-chunk", "scaled"])
def test_lora_kernel_equals_torch(case, mode):
    """The LoRA branch's kernels (lora.cc): scale * (x A^T) B^T and the gradients of x, A and B, as torch computes
    them. 300 rows go over the threads in chunks whose weight gradients are summed; alpha != rank scales."""
    rows, in_features, out_features, rank, alpha = case
    rng = np.random.default_rng(13)
    branch = cpu_form(LoRABranch(in_features, out_features, rank, alpha), KernelLoRABranch)
    assert branch.fused
    lora_A = rng.standard_normal((rank, in_features)).astype(np.float32)
    lora_B = rng.standard_normal((out_features, rank)).astype(np.float32)  # not zero, so every gradient is
    branch.lora_A.weight.set_data(ms.Tensor(lora_A))
    branch.lora_B.weight.set_data(ms.Tensor(lora_B))
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    weights = rng.standard_normal((rows, out_features)).astype(np.float32)
    want = _torch(lambda x, a, b: (x @ a.T) @ b.T * (alpha / rank), x, (lora_A, lora_B), weights)
    _assert_close(_ours(branch, x, weights, mode), want)


def test_lora_kernel_takes_any_leading_shape():
    """FusedQKVLoRA gives its branches (batch, tokens, width): the kernel path computes it as rows, like the plain
    branch's MatMuls."""
    rng = np.random.default_rng(14)
    fused, plain = cpu_form(LoRABranch(16, 12, 4, 4), KernelLoRABranch), LoRABranch(16, 12, 4, 4)
    assert fused.fused
    for branch in (fused, plain):
        branch.lora_A.weight.set_data(ms.Tensor(rng.standard_normal((4, 16)).astype(np.float32)))
        branch.lora_B.weight.set_data(ms.Tensor(np.linspace(-1, 1, 48, dtype=np.float32).reshape(12, 4)))
    plain.lora_A.weight.set_data(fused.lora_A.weight.value())
    x = ms.Tensor(rng.standard_normal((2, 5, 16)).astype(np.float32))
    got, want = fused(x).asnumpy(), plain(x).asnumpy()
    assert got.shape == want.shape == (2, 5, 12) and relative_error(got, want) < 1e-6


def test_lora_branches_with_dropout_use_mindspore_ops():
    """Dropout is not in the kernel: such a branch's CPU form takes the plain branch's MatMuls."""
    branch = cpu_form(LoRABranch(16, 16, 4, 4, dropout=0.1), KernelLoRABranch)
    assert not branch.fused
    assert branch(ms.Tensor(np.ones((3, 16), np.float32))).shape == (3, 16)


@pytest.mark.parametrize("form", ["cpu", "plain"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 16, 8, 8)])
@MODES
def test_nearest_upsampling_equals_torch(shape, form, mode):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    weights = rng.standard_normal((*shape[:2], 2 * shape[2], 2 * shape[3])).astype(np.float32)
    net = cpu_form(NearestUpsample2x(), KernelUpsample2x) if form == "cpu" else NearestUpsample2x()
    want = _torch(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), x, (), weights)
    _assert_close(_ours(net, x, weights, mode), want)


@pytest.mark.parametrize("form", ["cpu", "plain"])
@MODES
def test_silu_equals_torch(form, mode):
    rng = np.random.default_rng(10)
    x = (4 * rng.standard_normal((2, 5, 7, 9))).astype(np.float32)  # both tails of the sigmoid
    weights = rng.standard_normal(x.shape).astype(np.float32)
    net = cpu_form(nn.SiLU(), KernelSiLU) if form == "cpu" else nn.SiLU()
    _assert_close(_ours(net, x, weights, mode), _torch(F.silu, x, (), weights))

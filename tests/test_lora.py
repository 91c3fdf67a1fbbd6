"""LoRA on the UNet attention: MindONE names, zero-init identity, merge == unmerged, only LoRA trains; the
cross-attentions' keys/values of a fixed text computed once (context projections) change nothing."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops
from mindspore.nn.utils import no_init_parameters

from conftest import BACKENDS, BASE_CONFIG, SHARED, TINY_CONFIG
from gm.backends import apply_backend
from gm.modules.attention import CrossAttention
from gm.modules.frozen_weights import store_frozen_weights
from gm.modules.lora import freeze_all_but_lora, inject_lora, lora_layers, lora_parameters, set_lora_merged
from mindbooth.context_projections import ContextProjections
from test_unet import _Holder, build_unet, relative_error, run_ours

LORA_REFERENCE = SHARED / "reference" / "sdxl_keys" / "mindone" / "lora_conversion" / "ms_lora_params.txt"


def test_full_size_lora_names_and_shapes_equal_mindone_lora_checkpoint():
    reference = {}
    for line in LORA_REFERENCE.read_text().splitlines():
        if not line.strip():
            continue
        name, shape, _ = line.split("#")
        reference[name] = tuple(int(d) for d in shape.strip("()").split(","))
    with no_init_parameters():
        holder = _Holder(build_unet(BASE_CONFIG))
    assert inject_lora(holder, rank=4) == 560
    ours = {name: tuple(p.shape) for name, p in lora_parameters(holder).items()}
    assert ours == reference
    assert len(ours) == 1120


def _tiny_inputs(rng):
    return dict(
        x=rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        t=np.array([400.0], np.float32),
        context=rng.standard_normal((1, 77, 96)).astype(np.float32),
        y=rng.standard_normal((1, 1584)).astype(np.float32),
    )


def _randomize(unet, rng):
    for _, param in unet.parameters_and_names():
        param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))


def test_lora_identity_merge_and_trainable_set():
    rng = np.random.default_rng(0)
    holder = _Holder(build_unet(TINY_CONFIG))
    unet = holder.model.diffusion_model
    _randomize(unet, rng)
    inputs = _tiny_inputs(rng)
    base_out = run_ours(unet, inputs)
    base_weights = {n: p.asnumpy().copy() for n, p in holder.parameters_and_names()}

    inject_lora(holder, rank=2, alpha=4.0)
    # Base parameters keep their names and values; a fresh LoRA (B = 0) changes nothing.
    assert {n: p.asnumpy() for n, p in holder.parameters_and_names() if n in base_weights}.keys() == base_weights.keys()
    np.testing.assert_array_equal(run_ours(unet, inputs), base_out)

    freeze_all_but_lora(holder)
    trainable = [p.name for p in holder.trainable_params()]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(lora_layers(holder))

    for layer in lora_layers(holder):
        layer.lora_B.weight.set_data(ms.Tensor(rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32) * 0.1))
    with_lora = run_ours(unet, inputs)
    assert relative_error(with_lora, base_out) > 1e-3  # the LoRA now matters

    # scale = alpha / rank is applied: the delta equals 2 * B A for alpha 4, rank 2
    layer = lora_layers(holder)[0]
    np.testing.assert_allclose(layer.delta_weight().asnumpy(), 2.0 * layer.lora_B.weight.asnumpy() @ layer.lora_A.weight.asnumpy(), rtol=1e-6)

    set_lora_merged(holder, True)
    assert relative_error(run_ours(unet, inputs), with_lora) < 1e-5
    set_lora_merged(holder, False)
    for name, value in base_weights.items():
        np.testing.assert_allclose(dict(holder.parameters_and_names())[name].asnumpy(), value, atol=1e-6)
    # W + delta - delta is W up to fp32 rounding, which the layers carry to ~1e-6 of the output (5e-7 to 1e-6
    # measured, with the thread split of the process); the LoRA's own effect is > 1e-3 (above)
    assert relative_error(run_ours(unet, inputs), with_lora) < 1e-5


class _UNetSum(nn.Cell):
    """sum(UNet(x, t, context, y, cached_kv)), cached_kv None or the text's context_projections."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def construct(self, x, t, context, y, cached_kv=None):
        return self.unet(x, t, context, y, cached_kv).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen_dtype", [None, "fp16"])
def test_context_projections_give_the_same_output_and_lora_gradients(frozen_dtype, backend):
    # (PyNative; in GRAPH mode the trainer's steps use them: test_train_dreambooth's graph == PyNative losses)
    rng = np.random.default_rng(0)
    holder = _Holder(build_unet(TINY_CONFIG))
    unet = holder.model.diffusion_model
    _randomize(unet, rng)
    inject_lora(holder, rank=2, alpha=4.0)  # scale 2: the LoRA's own Mul is in the path
    freeze_all_but_lora(holder)
    if frozen_dtype:
        store_frozen_weights(holder, frozen_dtype)
    apply_backend(holder, backend)
    for layer in lora_layers(holder):  # a LoRA that matters, on to_k/to_v of the cross-attentions too
        layer.lora_B.weight.set_data(ms.Tensor(rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32) * 0.1))
    x, t, text, y = (ms.Tensor(value) for value in _tiny_inputs(rng).values())
    projections = unet.context_projections(text)
    cross_attentions = [cell for _, cell in unet.cells_and_names() if isinstance(cell, CrossAttention) and cell.is_cross]
    assert len(projections) == 2 * len(cross_attentions)

    loss_and_grads = ms.value_and_grad(_UNetSum(unet), None, holder.trainable_params())
    plain, plain_grads = loss_and_grads(x, t, text, y)
    cached, cached_grads = loss_and_grads(x, t, text, y, ms.mutable(projections))
    # The same products in the same order: equal to the bit, in the value and in every LoRA gradient
    assert float(cached.asnumpy()) == float(plain.asnumpy())
    for ours, reference in zip(cached_grads, plain_grads, strict=True):
        np.testing.assert_array_equal(ours.asnumpy(), reference.asnumpy())
    assert max(float(np.abs(g.asnumpy()).max()) for g in plain_grads) > 0
    # ... and the projections passed in are what the cross-attentions use
    zeroed, _ = loss_and_grads(x, t, text, y, ms.mutable(tuple(ops.zeros_like(p) for p in projections)))
    assert abs(float(zeroed.asnumpy()) - float(plain.asnumpy())) > 1e-3 * abs(float(plain.asnumpy()))


class _CountingUNet:
    def __init__(self):
        self.calls = 0

    def context_projections(self, text):
        self.calls += 1
        return (text * 2, text * 3)


def test_context_projections_are_computed_once_per_distinct_text():
    unet = _CountingUNet()
    projections = ContextProjections(unet)
    text = ms.Tensor(np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    first = projections(text)
    assert projections(ms.Tensor(text.asnumpy().copy())) is first and unet.calls == 1  # equal values: reused
    changed = projections(text + 1)
    assert unet.calls == 2
    np.testing.assert_array_equal(changed[0].asnumpy(), (text.asnumpy() + 1) * 2)
    projections(ms.Tensor(np.zeros((2, 2, 3), np.float32)))  # another shape
    assert unet.calls == 3

"""Frozen weights stored in fp16 (DiffusionEngine frozen_weight_dtype): same names, half the bytes, the fp32
model's UNet output and LoRA gradients in PyNative and GRAPH mode."""
import mindspore as ms
import numpy as np
import pytest

from conftest import ROOT
from gm.backends.cpu.conv import Conv2d
from gm.backends.cpu.lora import KernelLoRADense
from gm.modules.frozen_weights import FrozenDense, store_frozen_weights
from gm.modules.lora import lora_layers, lora_parameters
from gm.util import instantiate_from_config
from mindbooth.config import load_config
from mindbooth.tiny_model import random_weights
from mindbooth.train_step import DreamBoothLoss, GradStep, make_buffers
from test_unet import relative_error

TRAIN_CONFIG = ROOT / "configs" / "training" / "sd_xl_tiny_dreambooth_lora_cpu.yaml"


def _engine(frozen_weight_dtype=None, lora=True):
    config = load_config(TRAIN_CONFIG).model
    config.params.network_config.params.num_res_blocks = 1  # a third of the graph: GRAPH compiles fit the budget
    config.params.network_config.params.transformer_depth = [1, 1, 1]
    if not lora:
        del config.params.lora_config
    config.params.frozen_weight_dtype = frozen_weight_dtype
    return instantiate_from_config(config)


def _weights(engine, rng, fp16_exact: bool):
    """Random base weights (fp16-representable if fp16_exact, as SDXL's released fp16 weights are) and a LoRA
    with B != 0, so the LoRA branch matters."""
    weights = random_weights(engine, seed=5)
    for name in weights:
        if ".lora_" in name:
            weights[name] = (rng.standard_normal(weights[name].shape) * 0.05).astype(np.float32)
        elif fp16_exact:
            weights[name] = weights[name].astype(np.float16).astype(np.float32)
    return weights


def _load(engine, weights):
    # As mindbooth/checkpoint.py load_weights does.
    for name, param in engine.parameters_and_names():
        param.set_data(ms.Tensor(weights[name]).astype(param.dtype))


def _unet_inputs(rng):
    return (ms.Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32)), ms.Tensor(np.array([3.0, 917.0], np.float32)),
            ms.Tensor(rng.standard_normal((2, 77, 96)).astype(np.float32)), ms.Tensor(rng.standard_normal((2, 1584)).astype(np.float32)))


def _lora_grads(engine, rng):
    params = [p for _, p in sorted(lora_parameters(engine).items())]
    step = GradStep(DreamBoothLoss(engine, 1.0, True), params, make_buffers(params))
    step.set_train(True)
    inputs = (rng.standard_normal((2, 4, 8, 8)), rng.standard_normal((2, 4, 8, 8)), np.array([14.6, 0.03]),
              rng.standard_normal((2, 77, 96)), rng.standard_normal((2, 1584)))
    latents, noise, sigmas, crossattn, vector = (ms.Tensor(a.astype(np.float32)) for a in inputs)
    loss, _, _, finite = step(latents, noise, sigmas, (crossattn, vector), ms.Tensor(1.0, ms.float32), ms.Tensor(1.0, ms.float32))
    assert bool(finite.asnumpy())
    return float(loss.asnumpy()), np.concatenate([b.asnumpy().ravel() for b in step.buffers])


def _engine_pair(rng, fp16_exact: bool):
    """An fp32 engine and an fp16-stored one holding the same random weights."""
    fp32, fp16 = _engine(), _engine("float16")
    weights = _weights(fp32, rng, fp16_exact)
    _load(fp32, weights)
    _load(fp16, weights)
    return fp32, fp16, weights


@pytest.fixture(scope="module")
def engines():
    return _engine_pair(np.random.default_rng(0), fp16_exact=True)


def test_names_kept_frozen_bytes_halved_lora_stays_fp32(engines):
    fp32, fp16, _ = engines
    assert [n for n, _ in fp32.parameters_and_names()] == [n for n, _ in fp16.parameters_and_names()]
    # each Parameter's own name (what ms.save_checkpoint and Cell.compile use) is its path, unique
    assert all(param.name == path for path, param in fp16.parameters_and_names())
    for part in ("model", "first_stage_model"):
        frozen32 = sum(p.nbytes for n, p in getattr(fp32, part).parameters_and_names() if ".lora_" not in n)
        frozen16 = sum(p.nbytes for n, p in getattr(fp16, part).parameters_and_names() if ".lora_" not in n)
        assert frozen16 * 2 == frozen32
    assert all(p.dtype == ms.float32 for p in lora_parameters(fp16).values())
    assert all(p.dtype == ms.float32 for p in fp16.conditioner.get_parameters())  # text encoders are left alone
    unet = fp16.model.diffusion_model
    convs = [c for _, c in unet.cells_and_names() if isinstance(c, Conv2d)]
    assert convs and all(c.frozen_weight for c in convs)  # the CPU backend's, cast at use
    assert any(isinstance(c, FrozenDense) for _, c in unet.cells_and_names())
    assert all(layer.weight.dtype == ms.float16 for layer in lora_layers(fp16))


def test_fp16_stored_unet_equals_fp32_unet(engines):
    """(GRAPH mode is covered by the gradient test below: its loss is this output's.)"""
    fp32, fp16, _ = engines
    inputs = _unet_inputs(np.random.default_rng(1))
    out32 = fp32.model.diffusion_model(*inputs).asnumpy()
    out16 = fp16.model.diffusion_model(*inputs).asnumpy()
    # Same (fp16-representable) weights, fp32 compute in both: only the op order may differ.
    assert relative_error(out16, out32) < 1e-5


def test_fp16_rounding_of_fp32_weights_is_small():
    """fp32 weights that are not fp16-representable: storing them in fp16 rounds each by <= 2^-11 relative."""
    rng = np.random.default_rng(2)
    fp32, fp16, _ = _engine_pair(rng, fp16_exact=False)
    inputs = _unet_inputs(rng)
    error = relative_error(fp16.model.diffusion_model(*inputs).asnumpy(), fp32.model.diffusion_model(*inputs).asnumpy())
    assert 0 < error < 2e-3


def test_fp16_stored_lora_gradients_equal_fp32_in_graph_mode(engines):
    fp32, fp16, _ = engines
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        loss32, grads32 = _lora_grads(fp32, np.random.default_rng(3))
        loss16, grads16 = _lora_grads(fp16, np.random.default_rng(3))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert abs(loss16 - loss32) <= 1e-5 * abs(loss32)
    assert np.abs(grads32).max() > 0
    assert relative_error(grads16, grads32) < 1e-5


def test_fp16_stored_lora_gradients_equal_fp32_in_pynative(engines):
    fp32, fp16, _ = engines
    loss32, grads32 = _lora_grads(fp32, np.random.default_rng(4))
    loss16, grads16 = _lora_grads(fp16, np.random.default_rng(4))
    assert abs(loss16 - loss32) <= 1e-5 * abs(loss32)
    assert relative_error(grads16, grads32) < 1e-5


def test_lora_injected_after_storing_fp16_uses_the_cast_path():
    """Inference: the base model is built (fp16-stored) first, a LoRA file injects LoRA later: the new layers get the
    CPU backend's form too."""
    engine = _engine("float16", lora=False)
    assert engine.add_unet_lora(rank=2) > 0
    layer = lora_layers(engine)[0]
    assert isinstance(layer, KernelLoRADense)
    assert layer.weight.dtype == ms.float16 and layer.lora_A.weight.dtype == ms.float32


def test_unet_stores_each_block_in_the_frozen_dtype_as_it_is_built(monkeypatch):
    """UNetModel(weight_dtype=...) (what an engine with frozen_weight_dtype builds): every parameter is fp16 when the
    constructor returns, and each block was stored so before the next one was built, so the whole UNet never
    exists in fp32 (docs/performance.md, "Frozen weights in fp16")."""
    import gm.modules.diffusionmodules.openaimodel as openaimodel

    config = load_config(TRAIN_CONFIG).model.params.network_config
    fp32_bytes_when_stored = []
    stored_in = openaimodel.stored_in

    def watch(block, dtype):  # the fp32 bytes of the UNet built so far, before this block is stored
        fp32_bytes_when_stored.append(sum(p.nbytes for p in block.get_parameters() if p.dtype == ms.float32))
        return stored_in(block, dtype)

    monkeypatch.setattr(openaimodel, "stored_in", watch)
    unet = instantiate_from_config(config, weight_dtype="float16")
    params = list(unet.get_parameters())
    assert params and all(p.dtype == ms.float16 for p in params)
    blocks = len(unet.input_blocks) + 1 + len(unet.output_blocks)  # the first (a convolution) stored with the rest
    downsamplers = len(config.params.channel_mult) - 1
    assert len(fp32_bytes_when_stored) == blocks - downsamplers  # each block but those, then the rest of the UNet
    total_fp32 = 2 * sum(p.nbytes for p in params)
    assert max(fp32_bytes_when_stored) < total_fp32 / 2, (max(fp32_bytes_when_stored), total_fp32)


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="frozen weight dtype must be one of"):
        store_frozen_weights(_engine(lora=False).model, "float8")


_COMPILE_GRAD_STEP = """
import sys
import mindspore as ms
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_frozen_weights import _engine, _unet_inputs
from gm.modules.lora import lora_parameters
from mindbooth.train_step import DreamBoothLoss, GradStep, make_buffers
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
engine = _engine("float16")
params = list(lora_parameters(engine).values())
step = GradStep(DreamBoothLoss(engine, 1.0, True), params, make_buffers(params))
latents, _, context, vector = _unet_inputs(np.random.default_rng(0))
step(latents, latents * 0.5, ms.Tensor([3.0, 0.5], ms.float32), ms.mutable((context, vector)), ms.Tensor(1.0, ms.float32), ms.Tensor(1.0, ms.float32))
"""


def test_training_graph_copies_no_frozen_weight(tmp_path):
    """The GRAPH-mode gradient step (gradient buffers assigned: side effects) with fp16-stored frozen weights reads
    each weight where it is used, forward and backward (the Dense and convolution kernels read fp16 as stored), and
    never copies a stored weight first (TensorMove: MindSpore copies a parameter it loads more than once, which an
    ops.depend on the weight caused)."""
    import os
    import subprocess
    import sys

    from test_lean_ops import _kernel_graph_dependencies

    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_DUMP_IR_PASSES="graph_build",
               MS_DEV_SAVE_GRAPHS_PATH=str(tmp_path / "ir"), PYTHONPATH=str(ROOT))
    script = tmp_path / "compile_grad_step.py"  # a file: GRAPH mode reads the Cell's source
    script.write_text(_COMPILE_GRAD_STEP)
    run = subprocess.run([sys.executable, str(script), str(ROOT / "tests")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    nodes = [node for path in sorted((tmp_path / "ir").glob("graph_build_*.ir")) for node in _kernel_graph_dependencies(path)]
    # the step's UNet is in the parsed graph: its frozen Dense layers and LoRA branches, both ways
    assert {"DenseForward", "DenseBackwardData", "LoRAForward", "LoRABackward"} <= {node.kernel for node in nodes}
    assert "TensorMove" not in {node.op for node in nodes}


def test_if_unet_stored_in_fp16_halves_its_bytes_and_gives_the_fp32_output():
    """DeepFloyd IF's UNet (tiny stage I, LoRA on its attention) with frozen_weight_dtype float16: every frozen
    weight fp16, the LoRA fp32, and on the same (fp16-representable) weights the fp32 model's output."""
    config = load_config(ROOT / "configs" / "training" / "if_i_tiny_dreambooth_lora_cpu.yaml").model
    engines = []
    for dtype in (None, "float16"):
        config.params.frozen_weight_dtype = dtype
        engines.append(instantiate_from_config(config))
    fp32, fp16 = engines
    rng = np.random.default_rng(11)
    weights = _weights(fp32, rng, fp16_exact=True)
    _load(fp32, weights)
    _load(fp16, weights)
    params = dict(fp16.model.parameters_and_names())
    assert params.keys() == dict(fp32.model.parameters_and_names()).keys()
    trained = [p for p in params.values() if p.requires_grad]
    assert trained and all(p.dtype == ms.float32 for p in trained)
    assert all(p.dtype == ms.float16 for p in params.values() if not p.requires_grad)
    x = ms.Tensor(rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    t = ms.Tensor(np.array([3.0, 917.0], np.float32))
    cond = {"crossattn": ms.Tensor(rng.standard_normal((2, 77, 16)).astype(np.float32))}
    outputs = [engine.model(x, t, cond).asnumpy() for engine in (fp32, fp16)]
    assert relative_error(outputs[1], outputs[0]) < 1e-5

"""--finetune full (the paper's DreamBooth: every UNet weight trains) on the tiny model: the CPU backend's weight
gradients after make_trainable equal the plain backend's; a run changes every UNet weight and nothing else, saves the
whole model in the base file's layout (strictly loadable, equal to the trained weights, with freed encoders copied
from the base file), which the sampler loads and the converter converts; resume equals an uninterrupted run; bad
combinations are refused in one line before any work."""
import csv
import importlib.util
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY_CONFIG
from gm.modules.lora import lora_parameters
from gm.util import instantiate_from_config
from mindbooth import finetune, optim
from mindbooth.checkpoint import _tensor_names, load_weights, read_checkpoint
from mindbooth.config import load_config
from mindbooth.optim import AdamW, AdamWPerParameter
from mindbooth.train_step import ApplyStep, DreamBoothLoss, FusedStep, GradStep, buffered_gradients, make_buffers
from tiny_workspace import make_workspace

ONE = ms.Tensor(1.0, ms.float32)
CONV = "model.diffusion_model.input_blocks.0.0.weight"
DENSE = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The training tests' workspace (tests/tiny_workspace.py), an empty class folder, and an inference YAML of the
    same reduced tiny model for the sampler and the converter."""
    root = make_workspace(tmp_path_factory.mktemp("full"))
    (root / "class").mkdir()
    inference = load_config(TINY_CONFIG)
    trained = load_config(root / "train.yaml").model.params.network_config.params
    inference.model.params.network_config.params.num_res_blocks = trained.num_res_blocks
    inference.model.params.network_config.params.transformer_depth = list(trained.transformer_depth)
    OmegaConf.save(inference, root / "inference.yaml")
    return root


def _train(workspace, save_path, *extra):
    import train_dreambooth

    argv = ["--config", str(workspace / "train.yaml"), "--weight", str(workspace / "tiny.ckpt"),
            "--instance_data_path", str(workspace / "subject"), "--instance_prompt", "a photo of sks toy",
            "--class_data_path", str(workspace / "class"), "--class_prompt", "a photo of toy", "--num_class_images", "2",
            "--device_target", "CPU", "--save_path", str(save_path), "--save_ckpt_interval", "1", "--finetune", "full",
            "--learning_rate", "1e-3", "--ms_mode", "1", *extra]
    try:
        return train_dreambooth.main(argv)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _losses(folder):
    with open(folder / "loss.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _arrays(path):
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items()}


# ---- make_trainable: real weight gradients on the CPU backend ----------------------------------------------------

def _full_engine(workspace, backend):
    config = load_config(workspace / "train.yaml")
    config.train.finetune = "full"
    engine = instantiate_from_config(finetune.model_config(config), backend=backend)
    load_weights(engine, [str(workspace / "tiny.ckpt")])
    return engine


def _step_inputs(engine):
    """GradStep's inputs (less the loss scale and weight) of a fixed batch: an instance and a class row."""
    rng = np.random.default_rng(7)
    cond = engine.conditioner.encode({"txt": ["a photo of sks toy", "a photo of toy"], "original_size_as_tuple": [[32, 32]] * 2,
                                      "crop_coords_top_left": [[0, 0]] * 2, "target_size_as_tuple": [[32, 32]] * 2})
    return [ms.Tensor(rng.standard_normal((2, 4, 4, 4)).astype(np.float32)),
            ms.Tensor(rng.standard_normal((2, 4, 4, 4)).astype(np.float32)), ms.Tensor(np.array([0.5, 3.0], np.float32)),
            (cond["crossattn"], cond["vector"])]


def _unet_gradients(engine):
    """{name: gradient} of the prior-preservation loss on a fixed batch, for every UNet parameter (trainable)."""
    named = sorted((n, p) for n, p in engine.parameters_and_names() if p.requires_grad)
    params = [p for _, p in named]
    buffers = make_buffers(params)
    GradStep(DreamBoothLoss(engine, 1.0, True), params, buffers)(*_step_inputs(engine), ONE, ONE)
    return dict(zip((n for n, _ in named), buffered_gradients(buffers, params)))


def test_many_flat_groups_take_the_step_one_group_takes(workspace, monkeypatch):
    """A full fine-tune's parameters cut into flat groups (SD 1.5's 860M values: 13 groups of at most 2^26) take
    the step one flat vector takes: the same gradient norm and AdamW update of every weight."""
    results = []
    for limit in (1 << 26, 50_000):
        monkeypatch.setattr(optim, "GROUP_ELEMENTS", limit)
        engine = _full_engine(workspace, "plain")
        engine.make_trainable(["model.diffusion_model."])
        named = sorted((n, p) for n, p in engine.parameters_and_names() if p.requires_grad)
        params = [p for _, p in named]
        buffers = make_buffers(params)
        GradStep(DreamBoothLoss(engine, 1.0, True), params, buffers)(*_step_inputs(engine), ONE, ONE)
        norm = ApplyStep(buffers, AdamW(params, learning_rate=1e-3), 1, True, 1.0)()
        assert not any(np.abs(b.asnumpy()).max() for b in buffers)  # cleared for the next step
        results.append((len(buffers), float(norm.asnumpy()), {n: p.asnumpy() for n, p in named}))
    (one, norm_one, weights_one), (many, norm_many, weights_many) = results
    assert one == 1 and many > 5
    assert norm_many == pytest.approx(norm_one, rel=1e-5)
    for name, value in weights_one.items():
        np.testing.assert_allclose(weights_many[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_the_fused_step_takes_the_two_graph_step_and_skips_a_non_finite_one(workspace):
    """FusedStep (a full fine-tune without accumulation: no gradient buffer) gives GradStep + ApplyStep's loss,
    gradient norm and AdamW update of every weight; with a non-finite gradient it changes nothing and says so."""
    results = []
    for fused in (False, True):
        engine = _full_engine(workspace, "plain")
        engine.make_trainable(["model.diffusion_model."])
        named = sorted((n, p) for n, p in engine.parameters_and_names() if p.requires_grad)
        params = [p for _, p in named]
        optimizer = (AdamWPerParameter if fused else AdamW)(params, learning_rate=1e-3)
        if fused:
            step = FusedStep(DreamBoothLoss(engine, 1.0, True), params, optimizer, True, 1.0)
            loss, _, _, finite, norm = step(*_step_inputs(engine), ONE, ONE)
            assert bool(finite.asnumpy())
        else:
            buffers = make_buffers(params)
            loss = GradStep(DreamBoothLoss(engine, 1.0, True), params, buffers)(*_step_inputs(engine), ONE, ONE)[0]
            norm = ApplyStep(buffers, optimizer, 1, True, 1.0)()
        results.append((float(loss.asnumpy()), float(norm.asnumpy()), {n: p.asnumpy() for n, p in named}))
    (loss_two, norm_two, weights_two), (loss_fused, norm_fused, weights_fused) = results
    assert loss_fused == pytest.approx(loss_two, rel=1e-6) and norm_fused == pytest.approx(norm_two, rel=1e-5)
    assert norm_two > 1.0  # clipped: the clip is part of what is compared
    for name, value in weights_two.items():
        np.testing.assert_allclose(weights_fused[name], value, rtol=0, atol=1e-6, err_msg=name)

    inputs = _step_inputs(engine)
    inputs[0] = ms.Tensor(np.full(inputs[0].shape, np.nan, np.float32))
    before = {n: p.asnumpy().copy() for n, p in (*named, *optimizer.state().items())}
    _, _, _, finite, norm = step(*inputs, ONE, ONE)
    assert not bool(finite.asnumpy()) and np.isnan(float(norm.asnumpy()))
    for name, param in (*named, *optimizer.state().items()):
        np.testing.assert_array_equal(param.asnumpy(), before[name], err_msg=name)


def test_make_trainable_gives_the_cpu_backend_the_plain_weight_gradients(workspace):
    cpu, plain = _full_engine(workspace, "cpu"), _full_engine(workspace, "plain")
    conv = dict(cpu.cells_and_names())[CONV.rsplit(".", 1)[0]]
    assert conv.frozen_weight  # built frozen: its backward would leave the weight gradient at zero
    trained = cpu.make_trainable(["model.diffusion_model."])
    assert plain.make_trainable(["model.diffusion_model."]) == trained
    assert not conv.frozen_weight
    unet = {n for n, _ in cpu.parameters_and_names() if n.startswith("model.diffusion_model.")}
    assert trained == len(unet) and {n for n, p in cpu.parameters_and_names() if p.requires_grad} == unet
    cpu_grads, plain_grads = _unet_gradients(cpu), _unet_gradients(plain)
    assert cpu_grads.keys() == plain_grads.keys() == unet
    for name in (CONV, DENSE):
        assert np.abs(plain_grads[name]).max() > 1e-6, name
    # Per tensor, relative to its norm; tensors whose gradient is analytically ~0 (a bias before a norm that removes
    # it: measured 1e-8) are held to the largest gradient's scale instead. Measured: at most 1.5e-3 (a ResBlock's
    # emb_layers, whose gradient is such a cancellation), 5e-4 elsewhere; a zero weight gradient is off by 1.
    largest = max(np.linalg.norm(g) for g in plain_grads.values())
    differences = {}
    for name, reference in plain_grads.items():
        difference = np.linalg.norm(cpu_grads[name] - reference) / max(np.linalg.norm(reference), 1e-5 * largest)
        differences[name] = difference
    worst = max(differences.items(), key=lambda item: item[1])
    assert worst[1] < 5e-3, worst


def test_make_trainable_refuses_low_precision_weights(workspace):
    config = load_config(workspace / "train.yaml")
    config.train.finetune = "full"
    config.model.params.frozen_weight_dtype = "float16"
    engine = instantiate_from_config(finetune.model_config(config))
    with pytest.raises(ValueError, match="trained weights must be fp32"):
        engine.make_trainable(["model.diffusion_model."])


# ---- a full run --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(workspace):
    engine = _train(workspace, workspace / "run_a", "--total_step", "2")
    return engine, workspace / "run_a"


def test_full_run_trains_every_unet_weight_and_nothing_else(workspace, full_run):
    engine, run = full_run
    losses = _losses(run)
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert not lora_parameters(engine)
    base = _arrays(workspace / "tiny.ckpt")
    changed = []
    for name, param in engine.parameters_and_names():
        if name.startswith("model.diffusion_model."):
            changed.append(not np.array_equal(param.asnumpy(), base[name]))
        else:
            np.testing.assert_array_equal(param.asnumpy(), base[name], err_msg=name)
    assert all(changed), f"{changed.count(False)} UNet weights did not change"
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["SDXL-tiny_1_full.ckpt", "SDXL-tiny_2_full.ckpt"]


def test_saved_model_has_the_base_layout_loads_strictly_and_equals_the_trained_weights(workspace, full_run):
    engine, run = full_run
    saved = run / "SDXL-tiny_2_full.ckpt"
    assert _tensor_names(saved) == _tensor_names(workspace / "tiny.ckpt")  # same names, same order
    fresh = _full_engine(workspace, "auto")
    load_weights(fresh, [str(saved)])  # strict: every parameter present, nothing unexpected, shapes equal
    trained = dict(engine.parameters_and_names())
    for name, param in fresh.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), trained[name].asnumpy(), err_msg=name)


def test_resume_equals_the_uninterrupted_run(workspace, full_run):
    _, run_a = full_run
    run_b = workspace / "run_b"
    _train(workspace, run_b, "--total_step", "1")
    _train(workspace, run_b, "--total_step", "2", "--resume", str(run_b))
    np.testing.assert_allclose(_losses(run_b), _losses(run_a), rtol=1e-6)
    resumed, straight = _arrays(run_b / "SDXL-tiny_2_full.ckpt"), _arrays(run_a / "SDXL-tiny_2_full.ckpt")
    assert resumed.keys() == straight.keys()
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=0, atol=1e-6, err_msg=name)
    # and the optimizer moments and step of both runs' last states
    moments_b, moments_a = (_arrays(run / "state" / "step_2_optimizer.ckpt") for run in (run_b, run_a))
    for name in moments_a:
        np.testing.assert_allclose(moments_b[name], moments_a[name], rtol=0, atol=1e-6, err_msg=name)
    assert int(moments_a["adamw_step"]) == 2


def test_cached_latents_save_the_freed_encoders_from_the_base_and_rotate_only_own_files(workspace):
    run = workspace / "run_cached"
    run.mkdir()
    foreign = run / "SDXL-tiny_1_lora.ckpt"  # not a state of this run: never removed
    foreign.write_bytes(b"someone else's file")
    engine = _train(workspace, run, "--total_step", "2", "--cache_latents", "True", "--max_num_ckpt", "1")
    assert engine.conditioner is None and not hasattr(engine.first_stage_model, "encoder")
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["SDXL-tiny_1_lora.ckpt", "SDXL-tiny_2_full.ckpt"]
    assert foreign.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in (run / "state").iterdir()) == ["step_2.json", "step_2_optimizer.ckpt"]
    saved, base = _arrays(run / "SDXL-tiny_2_full.ckpt"), _arrays(workspace / "tiny.ckpt")
    assert saved.keys() == base.keys()
    freed = [n for n in base if n.startswith(("conditioner.", "first_stage_model.encoder.", "first_stage_model.quant_conv."))]
    assert freed
    for name in freed:
        np.testing.assert_array_equal(saved[name], base[name], err_msg=name)
    assert not np.array_equal(saved[CONV], base[CONV])


# ---- the saved model in the sampler and the converter -------------------------------------------------------------

def _sample(workspace, weight, save_path):
    spec = importlib.util.spec_from_file_location("sampling_without_streamlit", ROOT / "demo" / "sampling_without_streamlit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.main(["--config", str(workspace / "inference.yaml"), "--weight", str(weight), "--device_target", "CPU",
                     "--ms_mode", "1", "--width", "32", "--height", "32", "--sample_step", "2", "--seed", "3",
                     "--prompt", "a photo of sks toy", "--save_path", str(save_path)])
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    from PIL import Image

    images = sorted(save_path.rglob("*.png"))
    assert images, f"no image in {save_path}"
    return np.asarray(Image.open(images[0]).convert("RGB"))


def test_the_sampler_loads_the_saved_model_and_the_converter_converts_it(workspace, full_run, tmp_path):
    _, run = full_run
    saved = run / "SDXL-tiny_2_full.ckpt"
    trained_image = _sample(workspace, saved, tmp_path / "trained")
    base_image = _sample(workspace, workspace / "tiny.ckpt", tmp_path / "base")
    assert trained_image.shape == (32, 32, 3) and not np.array_equal(trained_image, base_image)
    out = tmp_path / "full.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "model_conversion" / "convert_weight.py"), "--config",
                           str(workspace / "inference.yaml"), "--no_progress", "--task", "ms_to_pt",
                           "--weight_ms", str(saved), "--weight_safetensors", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from safetensors.numpy import load_file

    converted = load_file(str(out))
    # the first UNet conv under the official (ldm) name: the trained value, not the base's
    np.testing.assert_array_equal(converted["model.diffusion_model.input_blocks.0.0.weight"], _arrays(saved)[CONV])


# ---- refusals ------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    from mindbooth import step_graphs, training

    def refuse(*_, **__):
        raise AssertionError("a model was built or compiled before the input was checked")

    monkeypatch.setattr(training, "instantiate_from_config", refuse)
    monkeypatch.setattr(step_graphs, "step_graphs_in_child", refuse)


def _one_line_error(workspace, save_path, *extra) -> str:
    with pytest.raises(SystemExit) as error:
        _train(workspace, save_path, *extra)
    text = str(error.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def test_bad_combinations_are_refused_in_one_line_before_any_work(workspace, full_run, tmp_path, no_model):
    _, run_a = full_run
    lora = tmp_path / "some_lora.ckpt"
    assert "--finetune must be one of lora, full, got 'half'" in _one_line_error(workspace, tmp_path / "r", "--finetune", "half")
    assert "with --finetune full the trained weights must be fp32" in _one_line_error(
        workspace, tmp_path / "r", "--frozen_weight_dtype", "bfloat16")
    assert "takes no LoRA" in _one_line_error(workspace, tmp_path / "r", "--weight", f"{workspace / 'tiny.ckpt'},{lora}")
    message = _one_line_error(workspace, run_a, "--resume", str(run_a), "--finetune", "lora")
    assert "the run was started with --finetune full, not lora" in message
    assert not (tmp_path / "r").exists()


def test_a_run_saved_before_the_finetune_key_resumes_with_the_yaml_that_now_has_it(workspace, tmp_path):
    from mindbooth.validation import config_differences

    run = tmp_path / "old_run"
    run.mkdir()
    current = load_config(workspace / "train.yaml")
    assert current.train.finetune == "lora"  # the shipped YAMLs say it
    old = OmegaConf.create(OmegaConf.to_container(current))
    del old.train["finetune"]
    OmegaConf.save(old, run / "config.yaml")
    assert list(config_differences(old, current)) == ["train.finetune"]
    finetune.align_with_resumed_run(current, run)
    assert config_differences(old, current) == {} and finetune.finetune_mode(current) == "lora"
    full = load_config(workspace / "train.yaml")
    full.train.finetune = "full"
    finetune.align_with_resumed_run(full, run)  # not dropped: check_finetune refuses the change of mode
    assert full.train.finetune == "full"

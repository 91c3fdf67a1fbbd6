"""DreamBooth-LoRA on the tiny IF stage I: the training YAML puts LoRA on every added-key/value attention projection;
a README-style run (class images sampled by the frozen stage I, LoRA saved, resume equal to the uninterrupted run), and
the command-line sampler renders with the run's LoRA."""
import importlib.util
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT
from gm.modules.diffusionmodules.if_layers import AddedKVAttention
from gm.modules.lora import LoRADense, lora_parameters
from gm.util import instantiate_from_config
from mindbooth.checkpoint import read_checkpoint
from mindbooth.config import load_config
from test_t5 import spiece_model  # noqa: F401  (a fixture: a small T5 SentencePiece model)
from tiny_workspace import checkpoint_arrays, run_losses, train

TRAINING = ROOT / "configs" / "training" / "if_i_tiny_dreambooth_lora_cpu.yaml"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_if_training_yaml_puts_lora_on_all_six_projections_of_every_attention(spiece_model):  # noqa: F811
    config = load_config(TRAINING)
    config.model.params.conditioner_config.params.emb_models[0].params.tokenizer_file = str(spiece_model)
    engine = instantiate_from_config(config.model)
    attentions = [(name, cell) for name, cell in engine.model.cells_and_names() if isinstance(cell, AddedKVAttention)]
    assert attentions
    for name, cell in attentions:
        for target in TARGETS:
            layer = cell
            for part in target.split("."):
                layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
            assert isinstance(layer, LoRADense), f"{name}.{target}"
    names = lora_parameters(engine)
    assert len(names) == 2 * len(TARGETS) * len(attentions)  # lora_A and lora_B per projection
    assert all(p.requires_grad for p in names.values())
    assert any(".add_k_proj.lora_A." in n for n in names) and any(".add_v_proj.lora_B." in n for n in names)


# ---- a DreamBooth-LoRA run on the tiny IF stage I, as the README runs it -----------------------------------------
STEPS = 2


@pytest.fixture(scope="module")
def if_workspace(tmp_path_factory):
    """The training YAML with its T5 tokenizer in the workspace, and a random tiny base + subject images from
    tools/make_tiny_model.py (which writes the missing tokenizer too)."""
    root = tmp_path_factory.mktemp("if_dreambooth")
    for source, name in ((TRAINING, "train.yaml"), (ROOT / "configs" / "inference" / "if_i_tiny.yaml", "infer.yaml")):
        config = load_config(source)
        config.model.params.conditioner_config.params.emb_models[0].params.tokenizer_file = str(root / "spiece.model")
        OmegaConf.save(config, root / name)
    make_tiny_model = _module(ROOT / "tools" / "make_tiny_model.py", "make_tiny_model").main
    make_tiny_model(["--config", str(root / "train.yaml"), "--weight_ms", str(root / "if_tiny.ckpt"),
                     "--subject_dir", str(root / "subject"), "--num_subject_images", "3"])
    assert (root / "spiece.model").is_file()
    yield root
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _train(root, save_path, *extra):
    return train(["--config", str(root / "train.yaml"), "--weight", str(root / "if_tiny.ckpt"),
                  "--instance_data_path", str(root / "subject"), "--instance_prompt", "a photo of sks toy",
                  "--class_data_path", str(root / "class"), "--class_prompt", "a photo of toy", "--num_class_images", "2",
                  "--device_target", "CPU", "--save_path", str(save_path), "--save_ckpt_interval", "1",
                  "--learning_rate", "3e-2", *extra])  # two steps that change the renders visibly


@pytest.fixture(scope="module")
def if_run(if_workspace):
    """(engine, run folder) of a STEPS-step run in GRAPH_MODE with class images sampled by the frozen stage I."""
    run = if_workspace / "run_a"
    return _train(if_workspace, run, "--total_step", str(STEPS)), run


def test_if_run_samples_class_images_and_trains_the_lora(if_workspace, if_run):
    engine, run = if_run
    class_images = sorted((if_workspace / "class").glob("*.png"))
    assert len(class_images) == 2
    for path in class_images:  # drawn by the DDPM sampler at stage I's native 16x16
        with Image.open(path) as image:
            assert image.size == (16, 16) and np.asarray(image).std() > 0
    losses = run_losses(run)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    lora = checkpoint_arrays(run / f"IF-I-tiny_{STEPS}_lora.ckpt")
    assert {k for k in lora if ".lora_" in k} == set(lora_parameters(engine))
    assert any(".add_k_proj.lora_B." in k for k in lora)
    assert max(np.abs(v).max() for k, v in lora.items() if ".lora_B." in k) > 0  # B starts at zero: it trained
    base = read_checkpoint(if_workspace / "if_tiny.ckpt")
    for name, param in engine.parameters_and_names():
        if ".lora_" not in name:
            np.testing.assert_array_equal(param.asnumpy(), base[name].asnumpy(), err_msg=name)
    with Image.open(run / "sample_final.png") as image:
        assert image.size == (16, 16)


def test_if_resume_equals_the_uninterrupted_run(if_workspace, if_run):
    _, run_a = if_run
    run_b = if_workspace / "run_b"
    _train(if_workspace, run_b, "--total_step", "1")
    _train(if_workspace, run_b, "--total_step", str(STEPS), "--resume", str(run_b))
    np.testing.assert_allclose(run_losses(run_b), run_losses(run_a), rtol=1e-6)
    resumed, straight = (checkpoint_arrays(run / f"IF-I-tiny_{STEPS}_lora.ckpt") for run in (run_b, run_a))
    assert resumed.keys() == straight.keys()
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=0, atol=1e-6, err_msg=name)


def test_if_precomputed_text_embeddings_train_the_same_lora_without_t5_in_the_model(if_workspace, if_run):
    """--pre_compute_text_embeddings: T5 encodes the run's prompts and is freed before the UNet is built (the engine
    has no text encoder), and the run trains what the run with T5 in the model trains."""
    _, run_a = if_run
    run_c = if_workspace / "run_c"
    engine = _train(if_workspace, run_c, "--total_step", str(STEPS), "--pre_compute_text_embeddings", "True")
    assert engine.conditioner is None and not any(n.startswith("conditioner.") for n, _ in engine.parameters_and_names())
    np.testing.assert_allclose(run_losses(run_c), run_losses(run_a), rtol=1e-5)
    trained, straight = (checkpoint_arrays(run / f"IF-I-tiny_{STEPS}_lora.ckpt") for run in (run_c, run_a))
    for name in straight:
        np.testing.assert_allclose(trained[name], straight[name], rtol=0, atol=1e-5, err_msg=name)


def test_pre_compute_text_embeddings_is_refused_for_a_latent_model(if_workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(["--config", str(ROOT / "configs" / "training" / "sd_v1.5_tiny_dreambooth_lora_cpu.yaml"),
                               "--weight", str(if_workspace / "if_tiny.ckpt"), "--instance_data_path", str(if_workspace / "subject"),
                               "--instance_prompt", "a photo of sks toy", "--device_target", "CPU",
                               "--save_path", str(if_workspace / "refused"), "--pre_compute_text_embeddings", "True"])
    assert "--pre_compute_text_embeddings is for DeepFloyd IF" in str(exit_info.value.code)
    assert not (if_workspace / "refused").exists()


def test_if_sampler_renders_with_the_trained_lora(if_workspace, if_run, tmp_path):
    """The command-line sampler with the inference config takes the base and the run's LoRA (put on the config's
    lora_targets) at --lora_scale (on the B weights): at 0 it renders the base's image; two training steps move a
    random tiny model's render by a step or two, so the LoRA is shown to act at scale 30."""
    _, run = if_run
    sampler = _module(ROOT / "demo" / "sampling_without_streamlit.py", "sampling_cli").main
    base, lora = if_workspace / "if_tiny.ckpt", run / f"IF-I-tiny_{STEPS}_lora.ckpt"
    images = {}
    for name, weights, scale in (("base", [base], 1.0), ("scale0", [base, lora], 0.0), ("scale30", [base, lora], 30.0)):
        paths = sampler(["--config", str(if_workspace / "infer.yaml"), "--weight", ",".join(map(str, weights)),
                         "--lora_scale", str(scale), "--prompt", "a photo of sks toy", "--sample_step", "4", "--seed", "3",
                         "--save_path", str(tmp_path / name), "--device_target", "CPU"])
        [png] = [p for p in paths if "grid" not in Path(p).name]
        images[name] = np.asarray(Image.open(png), dtype=np.int16)
    scale0_change = np.abs(images["scale0"] - images["base"]).max()
    lora_change = np.abs(images["scale30"] - images["base"]).mean()
    print(f"scale 0 changes the image by at most {scale0_change}, scale 30 by {lora_change:.1f} on average (8-bit steps)")
    assert scale0_change == 0
    assert lora_change > 5

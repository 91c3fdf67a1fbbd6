"""SD 1.5, SD 2.1 (v) and SSD-1B end to end, as the README's "Models" section runs them: a tiny random base from
tools/make_tiny_model.py, a short DreamBooth-LoRA run of train_dreambooth.py with the family's tiny CPU training
YAML (class images sampled at the model's resolution, a LoRA saved, finite losses), a --finetune full run of SD 1.5
whose saved model the sampler loads, the v-prediction loss of SD 2.1 against diffusers' velocity target, and
txt2img (img2img on SD 1.5) from the sampler CLI with the trained LoRA at the model's native resolution.
Resume == uninterrupted is the trainer's own machinery, shown for LoRA in tests/test_train_dreambooth.py and for
--finetune full in tests/test_finetune_full.py."""
import csv
import importlib.util

import mindspore as ms
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from gm.modules.lora import lora_parameters
from gm.util import instantiate_from_config
from mindbooth.checkpoint import load_weights, read_checkpoint
from mindbooth.config import load_config
from mindbooth.sampling_model import native_resolution, size_conditioned

# family -> (inference config, tiny training config, its `version`)
FAMILIES = {
    "sd_v1.5": ("sd_v1.5_tiny.yaml", "sd_v1.5_tiny_dreambooth_lora_cpu.yaml", "SD-1.5-tiny"),
    "sd_v2.1": ("sd_v2.1_tiny.yaml", "sd_v2.1_tiny_dreambooth_lora_cpu.yaml", "SD-2.1-v-tiny"),
    "ssd_1b": ("ssd_1b_tiny.yaml", "ssd_1b_tiny_dreambooth_lora_cpu.yaml", "SSD-1B-tiny"),
}
STEPS = 2
NUM_CLASS_IMAGES = 2


def _inference_config(family):
    return ROOT / "configs" / "inference" / FAMILIES[family][0]


def _training_config(family):
    return ROOT / "configs" / "training" / FAMILIES[family][1]


def _module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Per family a random tiny base from tools/make_tiny_model.py, and the subject images it draws."""
    root = tmp_path_factory.mktemp("families")
    make_tiny_model = _module(ROOT / "tools" / "make_tiny_model.py", "make_tiny_model").main
    for index, family in enumerate(FAMILIES):
        make_tiny_model(["--config", str(_inference_config(family)), "--weight_ms", str(root / f"{family}.ckpt"), "--seed", str(index),
                         *(["--subject_dir", str(root / "subject"), "--num_subject_images", "3"] if index == 0 else [])])
    yield root
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the trainer and the sampler switched the process to GRAPH_MODE


def _train(workspace, family, save_path, *extra):
    import train_dreambooth

    argv = ["--config", str(_training_config(family)), "--weight", str(workspace / f"{family}.ckpt"),
            "--instance_data_path", str(workspace / "subject"), "--instance_prompt", "a photo of sks toy",
            "--class_data_path", str(workspace / f"class_{family}"), "--class_prompt", "a photo of toy",
            "--num_class_images", str(NUM_CLASS_IMAGES), "--device_target", "CPU", "--save_path", str(save_path),
            "--save_ckpt_interval", str(STEPS), *extra]
    try:
        return train_dreambooth.main(argv)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _losses(folder):
    with open(folder / "loss.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _lora(path):
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items()}


@pytest.fixture(scope="module")
def trained(workspace):
    """family -> (engine, run folder) of a STEPS-step GRAPH_MODE run with the tiny training YAML as it is."""
    return {family: (_train(workspace, family, workspace / f"run_{family}", "--total_step", str(STEPS)), workspace / f"run_{family}")
            for family in FAMILIES}


def test_configs_name_their_resolution_and_conditioning():
    expected = {"sd_xl_base": (1024, True), "ssd_1b": (1024, True), "sd_v1.5": (512, False), "sd_v2.1": (768, False),
                "sd_v2.1_base": (512, False)}
    for name, (side, sized) in expected.items():
        config = load_config(ROOT / "configs" / "inference" / f"{name}.yaml")
        assert (native_resolution(config), size_conditioned(config)) == (side, sized), name
    for family in FAMILIES:  # a tiny training YAML is its inference config (base) plus the recipe, at the same size
        training, inference = load_config(_training_config(family)), load_config(_inference_config(family))
        assert training.data.resolution == native_resolution(inference) == native_resolution(training)
        without_lora = {k: v for k, v in training.model.params.items() if k not in ("lora_config", "frozen_weight_dtype")}
        assert without_lora == dict(inference.model.params)
    full = {"sd_v1.5": 512, "sd_v2.1": 768, "sd_v2.1_base": 512, "ssd_1b": 1024}
    for name, side in full.items():
        training = load_config(ROOT / "configs" / "training" / f"{name}_finetune_dreambooth_lora.yaml")
        inference = load_config(ROOT / "configs" / "inference" / f"{name}.yaml")
        assert training.data.resolution == side == native_resolution(training)
        assert training.model.params.network_config == inference.model.params.network_config
        assert training.model.params.denoiser_config == inference.model.params.denoiser_config
        assert training.model.params.loss_fn_config == inference.model.params.loss_fn_config


@pytest.mark.parametrize("family", list(FAMILIES))
def test_short_run_samples_class_images_and_saves_a_trained_lora(workspace, trained, family):
    engine, run = trained[family]
    side = native_resolution(load_config(_inference_config(family)))
    class_images = sorted((workspace / f"class_{family}").glob("*.png"))
    assert len(class_images) == NUM_CLASS_IMAGES
    for path in class_images:  # sampled by the frozen base at the model's own resolution
        with Image.open(path) as image:
            assert image.size == (side, side)
            assert np.asarray(image).std() > 0
    losses = _losses(run)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    version = FAMILIES[family][2]
    lora = _lora(run / f"{version}_{STEPS}_lora.ckpt")
    assert set(k for k in lora if ".lora_" in k) == set(lora_parameters(engine))
    assert max(np.abs(v).max() for k, v in lora.items() if ".lora_B." in k) > 0  # B starts at zero: it trained
    base = read_checkpoint(workspace / f"{family}.ckpt")  # the base stayed the file's
    for name, param in engine.parameters_and_names():
        if ".lora_" not in name:
            np.testing.assert_array_equal(param.asnumpy(), base[name].asnumpy(), err_msg=name)
    assert (run / "sample_final.png").is_file()


def test_full_finetune_of_sd15_saves_a_model_the_sampler_loads(workspace, sample, tmp_path):
    """--finetune full on SD 1.5: every UNet weight moves, the text encoder and VAE stay the base's, and the saved
    model (the base's names) renders through the sampler CLI."""
    family, run = "sd_v1.5", workspace / "run_sd_v1.5_full"
    _train(workspace, family, run, "--total_step", str(STEPS), "--finetune", "full", "--learning_rate", "1e-4")
    saved = _lora(run / f"{FAMILIES[family][2]}_{STEPS}_full.ckpt")
    base = _lora(workspace / f"{family}.ckpt")
    assert saved.keys() == base.keys()
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    moved = [k for k in unet if not np.array_equal(saved[k], base[k])]
    assert len(moved) > 0.9 * len(unet), f"{len(moved)} of {len(unet)} UNet weights trained"
    for key in set(base) - set(unet):
        np.testing.assert_array_equal(saved[key], base[key], err_msg=key)
    assert np.isfinite(_losses(run)).all()
    image = _read(sample(family, [run / f"{FAMILIES[family][2]}_{STEPS}_full.ckpt"], tmp_path / "full")[0])
    side = native_resolution(load_config(_inference_config(family)))
    assert image.shape == (side, side, 3) and image.std() > 0


def test_sd21_v_loss_is_the_velocity_mse_of_diffusers(workspace):
    """The training loss of the v model, per sample, equals mean((v_pred - v)^2) with diffusers' DDPMScheduler
    noising the latents and giving the velocity target (get_velocity), the UNet fed the scheduler's x_t."""
    from diffusers import DDPMScheduler

    config = load_config(_training_config("sd_v2.1"))
    engine = instantiate_from_config(config.model)
    load_weights(engine, [str(workspace / "sd_v2.1.ckpt")])
    engine.set_train(False)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    sigmas = engine.loss_fn.sample_sigmas(3, rng).astype(np.float32)
    cond = engine.conditioner.encode({"txt": ["a photo of sks toy", "a dog", ""]})
    assert cond["vector"].shape == (3, 0)  # no size conditioning: an empty vector
    loss = engine.loss_fn(engine.model, engine.denoiser, cond, ms.Tensor(latents), ms.Tensor(noise), ms.Tensor(sigmas)).asnumpy()

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    timesteps = engine.denoiser.sigma_to_idx(ms.Tensor(sigmas)).asnumpy().astype(np.int64)
    x0, eps, t = torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps)
    noisy = scheduler.add_noise(x0, eps, t).numpy()
    velocity = scheduler.get_velocity(x0, eps, t).numpy()
    v_pred = engine.model(ms.Tensor(noisy), ms.Tensor(timesteps.astype(np.float32)), cond).asnumpy()
    expected = ((v_pred - velocity) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


@pytest.fixture(scope="module")
def sample():
    main = _module(ROOT / "demo" / "sampling_without_streamlit.py", "sampling_without_streamlit").main

    def run(family, weights, save_path, *extra):
        argv = ["--config", str(_inference_config(family)), "--weight", ",".join(map(str, weights)), "--device_target", "CPU",
                "--ms_mode", "0", "--sample_step", "3", "--seed", "5", "--prompt", "a photo of sks toy", "--save_path",
                str(save_path), *map(str, extra)]
        return main(argv)
    return run


def _read(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_txt2img_and_img2img_with_the_trained_lora(workspace, trained, sample, family, tmp_path):
    base = workspace / f"{family}.ckpt"
    lora = trained[family][1] / f"{FAMILIES[family][2]}_{STEPS}_lora.ckpt"
    side = native_resolution(load_config(_inference_config(family)))
    with_lora = sample(family, [base, lora], tmp_path / "lora")  # no size flags: the model's native resolution
    without = sample(family, [base, lora], tmp_path / "scale0", "--lora_scale", "0")
    image, base_image = _read(with_lora[0]), _read(without[0])
    assert image.shape == (side, side, 3) and image.std() > 0
    assert np.abs(image - base_image).max() > 0  # the LoRA changes the image
    if family != "sd_v1.5":  # img2img is the same code for every family: once is enough
        return
    init = sorted((workspace / "subject").glob("*.png"))[0]
    edited = sample(family, [base, lora], tmp_path / "img2img", "--task", "img2img", "--img", init, "--width", side,
                    "--height", side, "--strength", "0.5")
    out = _read(edited[0])
    assert out.shape == (side, side, 3)
    resized = np.asarray(Image.open(init).convert("RGB").resize((side, side), Image.LANCZOS), np.float32)
    # A random tiny VAE does not reproduce the input: what img2img can keep of it is its VAE round trip.
    engine = instantiate_from_config(load_config(_inference_config(family)).model)
    load_weights(engine, [str(base)])
    engine.set_train(False)
    pixels = ms.Tensor(resized.transpose(2, 0, 1)[None] / 127.5 - 1.0, ms.float32)
    round_trip = engine.decode_first_stage(engine.encode_first_stage(pixels)).asnumpy()[0].transpose(1, 2, 0)
    round_trip = (np.clip(round_trip, -1.0, 1.0) + 1.0) * 127.5
    # half the noise levels: the image keeps more of the input than a txt2img draw of the same seed does
    assert np.abs(out - round_trip).mean() < np.abs(image - round_trip).mean()


@pytest.mark.parametrize("flag", [["--orig_width", "64"], ["--crop_coords_top", "8"], ["--sd_xl_base_ratios", "1.0_512"]])
def test_size_conditioning_flags_are_refused_for_sd(workspace, sample, flag, tmp_path):
    with pytest.raises(SystemExit) as stop:
        sample("sd_v1.5", [workspace / "sd_v1.5.ckpt"], tmp_path, *flag)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message
    assert flag[0] in message and "SD-1.5-tiny" in message and "--width/--height" in message
    assert not tmp_path.exists() or not list(tmp_path.iterdir())

"""The command-line sampler (demo/sampling_without_streamlit.py) on the tiny SDXL, run in-process.

All generations share one model config and base file, so the CLI reuses the loaded model and GRAPH_MODE
compiles once: the first run loads a LoRA (the UNet is compiled with its LoRA layers), later base-only
runs zero the LoRA branch. That a zeroed LoRA is the untouched base is checked on the denoiser itself."""
import importlib.util

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_CONFIG
from gm.modules.lora import inject_lora, lora_parameters
from gm.util import instantiate_from_config
from mindbooth import sampling_cli
from mindbooth.checkpoint import read_checkpoint, save_checkpoint_atomic, save_lora
from mindbooth.config import load_config
from mindbooth.images import to_uint8
from mindbooth.sampling_model import SamplingModel
from mindbooth.tiny_model import random_weights

SEED = 7


def _load_cli():
    spec = importlib.util.spec_from_file_location("sampling_without_streamlit", ROOT / "demo" / "sampling_without_streamlit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random tiny base, and two LoRA files: B and 2B (same A, rank 4, alpha 4)."""
    folder = tmp_path_factory.mktemp("weights")
    engine = instantiate_from_config(load_config(TINY_CONFIG).model)
    base = folder / "tiny.ckpt"
    save_checkpoint_atomic(random_weights(engine, seed=3), base)
    inject_lora(engine.model, rank=4, alpha=4)
    for name, param in engine.parameters_and_names():
        param.name = name
    rng = np.random.default_rng(5)
    lora_b = {name: rng.normal(0, 0.3, param.shape).astype(np.float32)
              for name, param in lora_parameters(engine).items() if ".lora_B." in name}
    paths = {"base": base}
    for factor, key in ((1.0, "lora"), (2.0, "lora_x2")):
        own = lora_parameters(engine)
        for name, value in lora_b.items():
            own[name].set_data(ms.Tensor(value * factor))
        paths[key] = folder / f"{key}.ckpt"
        save_lora(engine, paths[key], rank=4, alpha=4.0)
    yield paths
    ms.set_context(mode=ms.PYNATIVE_MODE)  # main() switched the process to GRAPH_MODE


@pytest.fixture(scope="module")
def cli(weights):
    main = _load_cli()

    def run(save_path, *extra, weight=None, size=("--width", "64", "--height", "64")):
        argv = ["--config", str(TINY_CONFIG), "--weight", weight or str(weights["base"]), "--device_target", "CPU",
                "--ms_mode", "0", *size, "--sample_step", "2", "--seed", str(SEED),
                "--prompt", "a photo of sks toy", "--save_path", str(save_path), *map(str, extra)]
        # later flags win in argparse, so `extra` overrides the defaults above
        return main(argv)
    return run


def read(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def lora_image(cli, weights, tmp_path_factory):
    paths = cli(tmp_path_factory.mktemp("lora"), "--sampler", "EulerAncestralSampler", weight=f"{weights['base']},{weights['lora']}")
    return read(paths[0])


@pytest.fixture(scope="module")
def base_image(cli, lora_image, tmp_path_factory):
    paths = cli(tmp_path_factory.mktemp("base"), "--sampler", "EulerAncestralSampler")
    return read(paths[0])


def test_same_seed_same_image_init_latent_equals_seed_draw(cli, base_image, tmp_path):
    again = cli(tmp_path / "again", "--sampler", "EulerAncestralSampler")
    assert np.array_equal(read(again[0]), base_image)
    # the noise the seed draws, given as a file: same image (a stochastic sampler, so later draws must match too)
    latent = np.random.default_rng(SEED).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latent.npy", latent)
    from_latent = cli(tmp_path / "latent", "--sampler", "EulerAncestralSampler", "--init_latent_path", tmp_path / "latent.npy")
    assert np.array_equal(read(from_latent[0]), base_image)
    other = cli(tmp_path / "other", "--sampler", "EulerAncestralSampler", "--seed", SEED + 1)
    assert np.abs(read(other[0]).astype(int) - base_image).mean() > 5


def test_hostile_prompts_write_only_new_files_inside_save_path(cli, tmp_path):
    long_prompt = "a " + "very " * 200 + "long/..\\prompt"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("../../etc/passwd\n\n" + long_prompt + "\n")
    save_path = tmp_path / "out" / "inner"
    save_path.mkdir(parents=True)
    (save_path / "etc_passwd-s7-0.png").write_bytes(b"keep me")  # the name the first image would take
    before = {p for p in tmp_path.rglob("*")}
    paths = cli(save_path, "--prompt", prompt_file)
    assert (save_path / "etc_passwd-s7-0.png").read_bytes() == b"keep me"
    assert len(paths) == 3  # 2 prompts (blank line skipped) + the grid
    assert set(tmp_path.rglob("*")) - before == set(paths)  # nothing else written, nothing outside save_path
    for path in paths:
        assert path.parent == save_path and ".." not in path.name and len(path.name) <= 80
        assert read(path).shape[:2] == ((128, 64) if "grid" in path.name else (64, 64))
    assert paths[0].name == "etc_passwd-s7-0-1.png"
    assert paths[1].name.startswith("a_very_very_") and "long" not in paths[1].name


def test_img2img_small_strength_is_the_vae_round_trip(cli, tmp_path):
    # 70x66 input: rounded down to 64x64 (the tiny model needs multiples of 32)
    pixels = np.linspace(0, 255, 70 * 66 * 3).reshape(66, 70, 3).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "input.png")
    args = ("--task", "img2img", "--img", tmp_path / "input.png")
    # strength 0.2 of 2 steps keeps only sigma 0: the output is decode(encode(input)) with the seed's posterior noise
    small = cli(tmp_path / "small", *args, "--strength", 0.2, size=())
    model = sampling_cli._loaded["model"]
    rng = np.random.default_rng(SEED)
    rng.standard_normal((1, 4, 8, 8))  # the initial noise draw comes first
    posterior_noise = ms.Tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    resized = np.asarray(Image.fromarray(pixels).resize((64, 64), Image.LANCZOS), np.float32)
    x = ms.Tensor((resized.transpose(2, 0, 1)[None] / 127.5 - 1.0).astype(np.float32))
    expected = to_uint8(model.engine.decode_first_stage(model.engine.encode_first_stage(x, posterior_noise)).asnumpy())[0]
    assert np.abs(read(small[0]).astype(int) - expected).max() <= 1
    full = cli(tmp_path / "full", *args, "--strength", 1.0, size=())
    assert np.abs(read(full[0]).astype(int) - expected).mean() > 5


def test_lora_changes_output_and_lora_scale_scales_it(cli, weights, lora_image, base_image, tmp_path):
    base, lora, lora_x2 = (str(weights[k]) for k in ("base", "lora", "lora_x2"))
    sampler = ("--sampler", "EulerAncestralSampler")
    assert np.abs(lora_image.astype(int) - base_image).mean() > 5
    zero = read(cli(tmp_path / "zero", *sampler, "--lora_scale", 0, weight=f"{base},{lora}")[0])
    assert np.array_equal(zero, base_image)
    # lora_scale multiplies alpha/rank: 2B at scale 0.5 is B at scale 1 (exact in binary floating point);
    # this also swaps a LoRA back in after base-only runs on the same loaded model
    half_of_double = read(cli(tmp_path / "half", *sampler, "--lora_scale", 0.5, weight=f"{base},{lora_x2}")[0])
    assert np.array_equal(half_of_double, lora_image)


def test_lora_scale_zero_is_the_untouched_base(weights):
    """A zero LoRA branch is the base bit for bit (tests/test_lora.py); here: set_lora puts exactly
    lora_scale * B_file into the model, and [] restores zero B after a LoRA was injected."""
    model = SamplingModel(TINY_CONFIG, weights["base"])
    assert not lora_parameters(model.engine)
    file_b = {k: v.asnumpy() for k, v in read_checkpoint(weights["lora"]).items() if ".lora_B." in k}
    model.set_lora([weights["lora"]], scale=0.0)
    own = lora_parameters(model.engine)
    assert set(file_b) == {k for k in own if ".lora_B." in k}
    assert all(not own[k].asnumpy().any() for k in file_b)
    model.set_lora([weights["lora_x2"]], scale=0.5)
    assert all(np.array_equal(own[k].asnumpy(), v) for k, v in file_b.items())
    model.set_lora([], scale=1.0)
    assert all(not own[k].asnumpy().any() for k in file_b)


def test_default_size_is_the_model_native_resolution():
    assert sampling_cli.output_size(None, None, None, 64, 512) == (512, 512)  # SD 1.5: no flags, native 512
    assert sampling_cli.output_size(None, None, None, 64, 768) == (768, 768)  # SD 2.1 (768-v)
    assert sampling_cli.output_size(256, None, None, 64, 512) == (256, 256)  # one side alone: square
    assert sampling_cli.output_size(None, 128, None, 64, 512) == (128, 128)
    assert sampling_cli.output_size(None, None, "0.5", 32, 512) == (704, 1408)  # a ratio still reads SDXL's table
    with pytest.raises(sampling_cli.UsageError, match="multiple of 64"):
        sampling_cli.output_size(None, None, None, 64, 96)


def test_size_table_and_safe_names():
    assert sampling_cli.output_size(None, None, "0.5", 32) == (704, 1408)
    assert sampling_cli.output_size(None, None, "1.0_512", 32) == (512, 512)
    assert sampling_cli.output_size(64, 64, "0.5", 32) == (64, 64)  # explicit size wins
    assert sampling_cli.output_size(512, None, "2.0", 32) == (512, 256)  # one side keeps the ratio's aspect
    assert sampling_cli.safe_stem("../../etc/passwd") == "etc_passwd"
    assert sampling_cli.safe_stem("..") == "image" and sampling_cli.safe_stem("-rf /") == "rf"
    assert sampling_cli.safe_stem("C:\\Windows\\x.png") == "C_Windows_x_png"
    assert len(sampling_cli.safe_stem("x" * 1000)) == sampling_cli.MAX_STEM_CHARS


@pytest.mark.parametrize("extra, message", [
    (["--weight", "missing/base.ckpt"], "weight file not found: missing/base.ckpt"),
    (["--sampler", "DDIM"], "unknown sampler 'DDIM'"),
    (["--task", "img2img", "--img", "{tmp}/not_an_image.png"], "cannot read image"),
    (["--task", "img2img", "--img", "{tmp}/missing.png"], "--img not found"),
    (["--init_latent_path", "{tmp}/wrong.npy"], "has shape (1, 4, 16, 16), expected (1, 4, 8, 8)"),
    (["--width", "72"], "--width 72 must be a positive multiple of 32"),
    (["--prompt", "{tmp}/empty.txt"], "has no prompts"),
    (["--weight", "{lora}"], "holds only LoRA weights; give the base model first"),
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan"),
    (["--lora_scale", "nan"], "--lora_scale must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--config", "{tmp}/missing.yaml"], "--config {tmp}/missing.yaml: no such file"),
    (["--config", "{tmp}/bad.yaml"], "is not valid YAML"),
    (["--config", "{tmp}/empty.txt"], "holds no settings"),
    (["--config", "{tmp}/scalar.yaml"], "holds no settings"),
])
def test_bad_input_is_one_line(cli, weights, tmp_path, extra, message):
    (tmp_path / "not_an_image.png").write_text("hello")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 16, 16), np.float32))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "scalar.yaml").write_text("42\n")
    extra = [e.format(tmp=tmp_path, lora=weights["lora"]) for e in extra]
    with pytest.raises(SystemExit) as error:
        cli(tmp_path / "out", *extra)
    text = str(error.value.code)
    assert text.startswith("error: ") and message.format(tmp=tmp_path) in text and "\n" not in text
    assert not (tmp_path / "out").exists()


def test_text_encoder_lora_file_loads_and_scales(cli, weights, lora_image, base_image, tmp_path):
    """A --train_text_encoder LoRA (the UNet part of `lora` plus text-encoder LoRA) loads into the same cached
    model: the text part changes the image; --lora_scale 0 is still the base."""
    engine = instantiate_from_config(load_config(TINY_CONFIG).model)
    engine.add_unet_lora(rank=4, alpha=4)
    engine.add_text_encoder_lora(rank=4, alpha=4)
    file_lora = {k: v.asnumpy() for k, v in read_checkpoint(weights["lora"]).items() if ".lora_" in k}
    rng = np.random.default_rng(11)
    for name, param in lora_parameters(engine).items():
        if name in file_lora:
            param.set_data(ms.Tensor(file_lora[name]))
        elif ".lora_B." in name:
            param.set_data(ms.Tensor(rng.normal(0, 0.3, param.shape).astype(np.float32)))
    text_lora = tmp_path / "text_lora.ckpt"
    save_lora(engine, text_lora, rank=4, alpha=4.0)
    sampler = ("--sampler", "EulerAncestralSampler")
    with_text = read(cli(tmp_path / "text", *sampler, weight=f"{weights['base']},{text_lora}")[0])
    assert np.abs(with_text.astype(int) - lora_image).mean() > 2
    zero = read(cli(tmp_path / "text_zero", *sampler, "--lora_scale", 0, weight=f"{weights['base']},{text_lora}")[0])
    assert np.array_equal(zero, base_image)
    again = read(cli(tmp_path / "unet_only", *sampler, weight=f"{weights['base']},{weights['lora']}")[0])
    assert np.array_equal(again, lora_image)  # swapping back zeroes the text-encoder LoRA


def test_a_prompt_longer_than_the_text_encoders_read_is_noted(tmp_path, capsys):
    args = sampling_cli.sampling_parser().parse_args(["--prompt", "red " * 100, "--width", "64", "--height", "64",
                                                      "--save_path", str(tmp_path / "out")])
    sampling_cli.validate(args, 32, 8)
    assert "note: --prompt is 25 token(s) longer than the 77 the text encoders read" in capsys.readouterr().out

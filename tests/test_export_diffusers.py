"""Export of a MindBooth `.ckpt` to a diffusers pipeline folder (`convert_weight.py --task ms_to_diffusers`, issue 32).

For each tiny family a random diffusers pipeline is built with diffusers/transformers at the tiny config's sizes
(builders of tests/test_convert_families.py), converted to a `.ckpt` through the diffusers-folder path and exported
back. The exported folder is read with diffusers' own `from_pretrained` (no network): every tensor equals the
original's, the components compute what the originals compute, the tokenizers tokenize as MindBooth's, and the
pipeline runs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from mindbooth.tensor_dtypes import ConversionError
from family_models import _clip, _vae, build_pipeline
from tools.model_conversion import conversion, diffusers_export
from tools.model_conversion.file_layout import SD1, SD2, SDXL, SSD1B, config_family
from tools.model_conversion.sdxl_layout import load_config, rule_mindspore_shapes

CONFIGS = ROOT / "configs" / "inference"
CLI = ROOT / "tools" / "model_conversion" / "convert_weight.py"
TINY = {SD1: "sd_v1.5_tiny", SD2: "sd_v2.1_tiny", SSD1B: "ssd_1b_tiny", SDXL: "sd_xl_tiny"}
PROMPTS = ["a photo of sks dog", "A PHOTO of an astronaut, riding a horse on Mars.", "caf\u00e9 & na\u00efve 123",
           "<html> & isn't it, don't? 1024x768 (sks:1.2) [dog] emoji \U0001f600 \u4e2d\u6587",
           "  spaces\tand\nnewlines  ", "word " * 90, ""]


def _sdxl_unet():
    """SDXL at sd_xl_tiny.yaml's sizes: attention at levels 1-2, depths 1 and 2, a transformer middle block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(4, 8, 16), cross_attention_dim=96,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1584)


def _perturbed(model):
    with torch.no_grad():  # diffusers zero-initialises some layers: make every value tell
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def build(family):
    """{component: model} of a tiny random pipeline whose numbers are the tiny config's (heads included)."""
    if family == SDXL:
        torch.manual_seed(0)
        return {"unet": _perturbed(_sdxl_unet()), "text_encoder": _perturbed(_clip(32, "quick_gelu")),
                "text_encoder_2": _perturbed(_clip(64, "gelu", projection_dim=48)), "vae": _perturbed(_vae(0.13025))}  # sd_xl_tiny.yaml's scale_factor
    return build_pipeline(family)


class Exported:
    def __init__(self, family, tmp):
        self.family, self.config = family, CONFIGS / f"{TINY[family]}.yaml"
        self.params = load_config(self.config)["model"]["params"]
        self.parts = build(family)
        self.source, self.ckpt, self.out = tmp / "pipe", tmp / "model.ckpt", tmp / "exported"
        for name, model in self.parts.items():
            model.save_pretrained(self.source / name)
        self.expected = rule_mindspore_shapes(self.config)
        conversion.diffusers_to_mindspore(self.source, self.ckpt, self.expected, progress=False)
        self.summary = diffusers_export.mindspore_to_diffusers(self.ckpt, self.out, self.expected, self.params,
                                                               config_family(self.config), progress=False)
        self.pipe = _pipeline_class(family).from_pretrained(self.out, local_files_only=True)


def _pipeline_class(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family in (SDXL, SSD1B) else StableDiffusionPipeline


@pytest.fixture(scope="module", params=list(TINY), ids=["sd1", "sd2", "ssd1b", "sdxl"])
def exported(request, tmp_path_factory):
    return Exported(request.param, tmp_path_factory.mktemp(TINY[request.param]))


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def _plain(state):  # transformers >= 5 names its CLIP text model's parameters without the `text_model.` prefix
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


# ------------------------------------------------------------------ layout and round trip
def test_folder_is_laid_out_as_save_pretrained(exported):
    out = exported.out
    texts = ["text_encoder", "text_encoder_2"] if exported.family in (SDXL, SSD1B) else ["text_encoder"]
    expected = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors"}
    for i, text in enumerate(texts):
        tokenizer = "tokenizer" + ("_2" if i else "")
        expected |= {f"{text}/config.json", f"{text}/model.safetensors", f"{tokenizer}/vocab.json",
                     f"{tokenizer}/merges.txt", f"{tokenizer}/tokenizer_config.json",
                     f"{tokenizer}/special_tokens_map.json"}
    found = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert found == expected
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == _pipeline_class(exported.family).__name__


def test_every_tensor_equals_the_original(exported):
    for name, original in exported.parts.items():
        loaded = getattr(exported.pipe, name)
        want, got = _plain(original.state_dict()), _plain(loaded.state_dict())
        assert set(got) == set(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{name}: {key}"


def test_model_configs_are_the_originals(exported):
    """The derived config.json numbers are those the original models were built with."""
    def same(a, b):
        return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)

    def per_level(value, n):  # heads / depths: an int means the same for every level
        return list(value) if isinstance(value, (list, tuple)) else [value] * n

    unet, original = exported.pipe.unet.config, exported.parts["unet"].config
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "mid_block_type",
                "cross_attention_dim", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "in_channels", "out_channels"):
        assert same(unet.get(key), original.get(key)), key
    levels = len(original.block_out_channels)
    assert per_level(unet.attention_head_dim, levels) == per_level(original.attention_head_dim, levels)
    attention = [t.startswith("CrossAttn") for t in original.down_block_types]
    ours = per_level(unet.transformer_layers_per_block, levels)
    theirs = per_level(original.transformer_layers_per_block, levels)
    assert [o for o, a in zip(ours, attention) if a] == [t for t, a in zip(theirs, attention) if a]
    vae, original = exported.pipe.vae.config, exported.parts["vae"].config
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types", "up_block_types"):
        assert same(vae.get(key), original.get(key)), key
    for name in ("text_encoder", "text_encoder_2"):
        if name in exported.parts:
            config, want = getattr(exported.pipe, name).config, exported.parts[name].config
            for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "hidden_act", "max_position_embeddings"):
                assert getattr(config, key) == getattr(want, key), f"{name}: {key}"
            assert type(getattr(exported.pipe, name)) is type(exported.parts[name])
            if name == "text_encoder_2":
                assert config.projection_dim == want.projection_dim


# ------------------------------------------------------------------ the components compute the same
def test_unet_output_matches(exported):
    torch.manual_seed(1)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, exported.pipe.unet.config.cross_attention_dim)
    kwargs = {}
    if exported.family in (SDXL, SSD1B):
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 48), "time_ids": torch.randn(2, 6) * 100}
    with torch.no_grad():
        want = exported.parts["unet"](sample, 321, context, **kwargs).sample
        got = exported.pipe.unet(sample, 321, context, **kwargs).sample
    assert want.abs().max() > 0.1
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_text_encoders_and_vae_outputs_match(exported):
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72, [49406, 2368, 49407] + [0] * 74])
    for name in ("text_encoder", "text_encoder_2"):
        if name not in exported.parts:
            continue
        with torch.no_grad():
            want = exported.parts[name](ids, output_hidden_states=True)
            got = getattr(exported.pipe, name)(ids, output_hidden_states=True)
        assert torch.allclose(got.hidden_states[-2], want.hidden_states[-2], atol=1e-6)
        assert torch.allclose(got[0], want[0], atol=1e-6)
        if name == "text_encoder_2":  # SDXL's pooled, projected embedding
            assert torch.allclose(got.text_embeds, want.text_embeds, atol=1e-6)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(exported.pipe.vae.decode(latents).sample,
                              exported.parts["vae"].decode(latents).sample, atol=1e-5)


def test_scheduler_is_the_configs_discretization(exported):
    from gm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization

    scheduler = exported.pipe.scheduler
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    assert np.allclose(scheduler.betas.numpy(), LegacyDDPMDiscretization().betas, rtol=1e-6, atol=0)
    want = "v_prediction" if exported.family == SD2 else "epsilon"
    assert scheduler.config.prediction_type == want


def test_tokenizers_tokenize_as_mindbooth(exported):
    from gm.modules.embedders.tokenizer import CLIPTokenizer

    tokenizers = [("tokenizer", exported.family != SD2)]
    if exported.family in (SDXL, SSD1B):
        tokenizers.append(("tokenizer_2", False))
    for name, pad_with_eos in tokenizers:
        theirs = getattr(exported.pipe, name)
        ours = CLIPTokenizer(max_length=77, pad_with_eos=pad_with_eos)
        got = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        assert np.array_equal(np.array(got), ours(PROMPTS)), name
        assert theirs.pad_token == ("<|endoftext|>" if pad_with_eos else "!")
        # A known difference of the released diffusers OpenCLIP tokenizers (diffusers issue 4153), kept as released:
        # their pad token "!" is special, so a "!" in a prompt becomes id 0; CLIP-L's and MindBooth's read it as text.
        bang = theirs("wow!", padding="max_length", max_length=77).input_ids
        assert np.array_equal(bang, ours("wow!")[0]) == pad_with_eos


def test_pipeline_runs_from_the_folder(exported):
    out = exported.pipe(prompt="a photo of sks dog", num_inference_steps=2, height=64, width=64,
                        output_type="np", generator=torch.Generator().manual_seed(0), guidance_scale=2.0).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


# ------------------------------------------------------------------ configs as diffusers reads the YAML
@pytest.mark.parametrize("name", ["sd_v1.5", "sd_v2.1", "sd_v2.1_base", "sd_xl_base"])
def test_full_size_unet_config_is_diffusers_reading_of_the_yaml(name):
    """diffusers' own LDM-YAML reader (single_file_utils) gives the same UNet numbers for the released models."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from tools.model_conversion.diffusers_configs import unet_config

    config = CONFIGS / f"{name}.yaml"
    params = load_config(config)["model"]["params"]
    ours = unet_config(params, config_family(config))
    theirs = create_unet_diffusers_config_from_ldm(load_config(config), {}, image_size=ours["sample_size"] * 8)
    for key, value in theirs.items():
        if key in ("upcast_attention",):  # a run-time precision choice of diffusers' SD 2 configs
            continue
        want = list(value) if isinstance(value, tuple) else value
        have = ours.get(key)
        if isinstance(have, int) and isinstance(want, list):
            have = [have] * len(want)
        assert have == want, key


# ------------------------------------------------------------------ refusals and atomicity
@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Exported(SD1, tmp_path_factory.mktemp("sd1_again"))


def test_a_non_empty_output_folder_is_refused_and_kept(sd1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    message = _error(diffusers_export.mindspore_to_diffusers, sd1.ckpt, out, sd1.expected, sd1.params, SD1,
                     progress=False)
    assert message == f"output folder {out} exists and is not empty: choose a new or empty folder"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert "is a file" in _error(diffusers_export.mindspore_to_diffusers, sd1.ckpt, out / "mine.txt", sd1.expected,
                                 sd1.params, SD1, progress=False)


def test_an_empty_output_folder_is_filled(sd1, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    diffusers_export.mindspore_to_diffusers(sd1.ckpt, out, sd1.expected, sd1.params, SD1, progress=False,
                                            dtype="fp16")
    from safetensors.torch import load_file

    state = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    original = sd1.parts["unet"].state_dict()
    assert all(v.dtype == torch.float16 for v in state.values())
    assert all(torch.equal(state[k], original[k].half()) for k in original)


def test_a_checkpoint_of_another_family_is_refused_with_no_folder(sd1, tmp_path):
    config = CONFIGS / "sd_xl_tiny.yaml"
    out = tmp_path / "out"
    message = _error(diffusers_export.mindspore_to_diffusers, sd1.ckpt, out, rule_mindspore_shapes(config),
                     load_config(config)["model"]["params"], SDXL, progress=False)
    assert "looks like Stable Diffusion 1.x, not SDXL base 1.0" in message
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_nothing(sd1, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffusers_export, "tokenizer_files", fail)
    with pytest.raises(KeyboardInterrupt):
        diffusers_export.mindspore_to_diffusers(sd1.ckpt, tmp_path / "out", sd1.expected, sd1.params, SD1,
                                                progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_filled_meanwhile_is_kept(sd1, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = diffusers_export._fsync_tree

    def other_process_fills_it(root):
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        real(root)

    monkeypatch.setattr(diffusers_export, "_fsync_tree", other_process_fills_it)
    message = _error(diffusers_export.mindspore_to_diffusers, sd1.ckpt, out, sd1.expected, sd1.params, SD1,
                     progress=False)
    assert "was filled by another process" in message
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_command_line(sd1, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(CLI), "--task", "ms_to_diffusers", "--no_progress", *args],
                              capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    config = str(CONFIGS / "sd_v1.5_tiny.yaml")
    out = tmp_path / "cli"
    done = run("--config", config, "--weight_ms", str(sd1.ckpt), "--weight_diffusers", str(out))
    assert done.returncode == 0 and done.stdout.startswith(f"wrote {out}: "), done.stderr
    from safetensors.torch import load_file

    for name in ("unet", "vae"):
        want = load_file(str(sd1.out / name / "diffusion_pytorch_model.safetensors"))
        got = load_file(str(out / name / "diffusion_pytorch_model.safetensors"))
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    again = run("--config", config, "--weight_ms", str(sd1.ckpt), "--weight_diffusers", str(out))
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: output folder {out} exists and is not empty: choose a new or empty folder"
    assert "Traceback" not in again.stderr
    forced = run("--config", config, "--weight_ms", str(sd1.ckpt), "--weight_diffusers", str(out), "--overwrite")
    assert forced.returncode == 1 and "takes no --overwrite" in forced.stderr
    check = run("--config", config, "--weight_ms", str(sd1.ckpt), "--weight_diffusers", str(tmp_path / "n"), "--check")
    assert check.returncode == 0 and check.stdout.startswith("ok: ") and not (tmp_path / "n").exists()
    missing = run("--config", config, "--weight_ms", str(sd1.ckpt))
    assert missing.returncode == 1 and "needs --weight_diffusers" in missing.stderr


@pytest.mark.parametrize("name", ["sd_v1.5", "sd_v2.1", "sd_v2.1_base", "sd_xl_base", "ssd_1b"])
def test_full_size_configs_build_models_of_the_checkpoints_names_and_shapes(name):
    """At full size (no weights: models on the meta device, the checkpoint as names and shapes), diffusers and
    transformers build, from the configs written, models whose parameters are exactly the tensors exported."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tools.model_conversion.safetensors_stream import TensorInfo

    config = CONFIGS / f"{name}.yaml"
    files, texts = diffusers_export.folder_configs(load_config(config)["model"]["params"], config_family(config))
    reader = SimpleNamespace(path=config, tensors={n: TensorInfo(n, "F32", s)
                                                   for n, s in rule_mindspore_shapes(config).items()})
    parts = diffusers_export.components(reader, [(index, kind) for index, kind, _ in texts])
    assert set(parts) == {"unet", "vae"} | {f for f, _ in diffusers_export.TEXT_FOLDERS[:len(texts)]}
    with torch.device("meta"):
        for component, part in parts.items():
            settings = files[f"{component}/config.json"]
            if component == "unet":
                model = UNet2DConditionModel.from_config(settings)
            elif component == "vae":
                model = AutoencoderKL.from_config(settings)
            else:
                text_config = CLIPTextConfig(**{k: v for k, v in settings.items() if k != "architectures"})
                cls = CLIPTextModelWithProjection if "projection_dim" in settings else CLIPTextModel
                assert settings["architectures"] == [cls.__name__]
                model = cls(text_config)
            want = {k: tuple(v.shape) for k, v in _plain(model.state_dict()).items() if not k.endswith("position_ids")}
            got = {k: shape for k, (shape, _, _, _) in _plain(part.tensors).items()}
            assert got == want, component

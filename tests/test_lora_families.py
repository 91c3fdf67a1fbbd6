"""LoRA export / import / merge per model family (issue 32): SD 1.5, SD 2.1 and SSD-1B, beside SDXL
(tests/test_lora_conversion.py).

Each family's tiny pipeline is built in diffusers/transformers and converted to MindBooth (test_convert_families'
builders), so both hold the SAME base weights. A MindBooth engine of the tiny config with UNet and text-encoder LoRA
(random A and B) is saved as the trainer saves a LoRA; its exports are loaded by diffusers' own
`StableDiffusionPipeline.load_lora_weights` and must give MindBooth's UNet and text-encoder outputs.
"""
import copy
import json
import re
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import TINY_CONFIG
from gm.modules.lora import is_lora_name, lora_layers
from gm.util import instantiate_from_config, load_params
from mindbooth.checkpoint import save_lora
from mindbooth.config import load_config
from mindbooth.tensor_dtypes import ConversionError
from family_models import TINY, build_pipeline
from test_unet import relative_error
from tools.lora_conversion import lora_formats as lf
from tools.lora_conversion.convert_lora import convert, main as convert_main, read_state, write_ckpt
from tools.lora_conversion.lora_family import family_from_config
from tools.lora_conversion.merge_lora import merge
from tools.model_conversion.file_layout import SD1, SD2, SSD1B

RANK, ALPHA = 4, 8.0
# UNet attention projections (attn1/attn2 x q/k/v/out) and text-encoder ones (2 layers x q/k/v/out per encoder)
# transformers: SD 1.x/2.x 2 x 3 down + 1 middle + 3 x 3 up; SSD-1B its per-block depths, no middle one
UNET_LAYERS = {SD1: 16 * 8, SD2: 16 * 8, SSD1B: (1 + 2 + 2 + 1 + 2 + 1 + 1 + 1 + 1 + 2) * 8}
TEXT_LAYERS = {SD1: 8, SD2: 8, SSD1B: 16}


def _unet_inputs(family, rng):
    context = {SD1: 32, SD2: 64, SSD1B: 96}[family]
    inputs = dict(x=rng.standard_normal((1, 4, 8, 8)).astype(np.float32), t=np.array([617.0], np.float32),
                  context=rng.standard_normal((1, 77, context)).astype(np.float32))
    if family == SSD1B:
        inputs["y"] = rng.standard_normal((1, 1584)).astype(np.float32)
    return inputs


def _ours_unet(engine, inputs):
    args = (ms.Tensor(inputs[k]) for k in ("x", "t", "context", "y") if k in inputs)
    return engine.model.diffusion_model(*args).asnumpy()


def _ours_text(engine, ids):
    """The first text encoder's hidden states (SD 1.x: after final_layer_norm; SD 2.x: ln_final of its last layer)."""
    out = engine.conditioner.embedders[0](ms.Tensor(ids))
    return out.asnumpy()


def _tiny_pipeline(family, folder):
    """The family's tiny diffusers pipeline (tests/family_models.py) and its MindBooth checkpoint."""
    from tools.model_conversion import conversion
    from tools.model_conversion.sdxl_layout import model_mindspore_shapes

    parts = build_pipeline(family)
    for name, model in parts.items():
        model.save_pretrained(folder / "pipe" / name)
    ckpt = folder / "pipe.ckpt"
    conversion.diffusers_to_mindspore(folder / "pipe", ckpt, model_mindspore_shapes(TINY[family]), progress=False)
    return SimpleNamespace(parts=parts, ckpt=ckpt)


class Case:
    """One family: the tiny pipeline in diffusers and as a MindBooth checkpoint, an engine with random UNet and
    text-encoder LoRA saved as a MindBooth LoRA, and its UNet / text-encoder outputs."""

    def __init__(self, family, folder):
        self.family, self.folder, self.config = family, folder, TINY[family]
        self.pipe = _tiny_pipeline(family, folder)
        config = load_config(self.config).model
        config.params.lora_config = {"rank": RANK, "alpha": ALPHA, "text_encoder": True}
        self.engine = instantiate_from_config(config)
        self.base = {n: t.asnumpy() for n, t in ms.load_checkpoint(str(self.pipe.ckpt)).items()}
        rng = np.random.default_rng(7)
        self.lora = {n: (rng.standard_normal(p.shape) * (0.2 if n.startswith("conditioner.") else 0.1))
                     .astype(np.float32) for n, p in self.engine.parameters_and_names() if is_lora_name(n)}
        load_params(self.engine, {**self.base, **self.lora}, strict=True)
        self.lora_ckpt = folder / "lora.ckpt"
        save_lora(self.engine, self.lora_ckpt, RANK, ALPHA)
        self.inputs = _unet_inputs(family, rng)
        self.ids = rng.integers(1, 49000, (1, 77)).astype(np.int32)
        self.ids[0, 9:] = 49407  # end of text, then padding with it
        self.unet_out = _ours_unet(self.engine, self.inputs)
        self.text_out = _ours_text(self.engine, self.ids)


@pytest.fixture(scope="module", params=list(TINY), ids=["sd1", "sd2", "ssd1b"])
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param.replace(" ", "_")))


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_engine_has_the_familys_lora_layers(case):
    unet = [n for n in case.lora if n.startswith("model.")]
    text = [n for n in case.lora if n.startswith("conditioner.")]
    assert len(unet) == 2 * UNET_LAYERS[case.family] and len(text) == 2 * TEXT_LAYERS[case.family]
    assert len(lora_layers(case.engine)) == UNET_LAYERS[case.family] + TEXT_LAYERS[case.family]
    if case.family == SD2:  # OpenCLIP ViT-H: one LoRA per row block of the fused in_proj
        assert "conditioner.embedders.0.model.transformer.resblocks.1.attn.in_proj_lora.v_proj.lora_A.weight" in text


# ---------------------------------------------------------------- export -> import is the identity

@pytest.mark.parametrize("task", ["ms_to_diffusers", "ms_to_kohya"])
def test_export_then_import_is_bit_identical_with_the_familys_names(case, task):
    exported = case.folder / f"{task}.safetensors"
    summary = convert(task, case.lora_ckpt, exported, config=str(case.config), overwrite=True)
    layers = UNET_LAYERS[case.family] + TEXT_LAYERS[case.family]
    assert summary["layers"] == layers and summary["text_encoder_layers"] == TEXT_LAYERS[case.family]
    back = case.folder / f"{task}_back.ckpt"
    summary = convert("to_ms", exported, back, config=str(case.config), overwrite=True)
    assert summary["format"] == task[len("ms_to_"):] and summary["layers"] == layers
    loaded = ms.load_checkpoint(str(back))
    assert set(loaded) == set(case.lora) | {"lora_rank", "lora_alpha"}
    for name, value in case.lora.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)

    with safe_open(str(exported), "np") as f:
        meta, keys = f.metadata(), set(f.keys())
    sd = case.family in (SD1, SD2)
    if task == "ms_to_kohya":
        assert meta["ss_base_model_version"] == {SD1: "sd_v1", SD2: "sd_v2_v", SSD1B: "sdxl_base_v1-0"}[case.family]
        assert meta["ss_v2"] == str(case.family == SD2) and meta["ss_v_parameterization"] == str(case.family == SD2)
        # sd-scripts: SD 1.x/2.x UNet modules by diffusers names, one text encoder `lora_te_`; SDXL-like: sgm, te1/te2
        unet = ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k" if sd else
                "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k")
        assert f"{unet}.alpha" in keys
        text = ["lora_te_"] if sd else ["lora_te1_", "lora_te2_"]
        assert {k.split("text_model")[0] for k in keys if k.startswith("lora_te")} == set(text)
        assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight" in keys or not sd
    else:
        assert meta["base_model"] == family_from_config(case.config).base_model
        components = ["unet", "text_encoder"] + ([] if sd else ["text_encoder_2"])
        assert {k.split(".")[0] for k in keys} == set(components)
        config = json.loads(meta[lf.LORA_ADAPTER_METADATA_KEY])
        for component in components:
            assert config[f"{component}.r"] == RANK and config[f"{component}.lora_alpha"] == ALPHA
        # SD 2.x's fused q/k/v leave as transformers' separate projections
        assert "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_A.weight" in keys
        assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys) == sd


# ---------------------------------------------------------------- diffusers' pipeline loads them like our model

def _pipeline(case):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = copy.deepcopy(case.pipe.parts)  # shared with the other tests: the LoRA goes on copies
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=None,
                                   unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _theirs(pipe, case):
    with torch.no_grad():
        text = pipe.text_encoder(input_ids=torch.from_numpy(case.ids).long()).last_hidden_state.numpy()
        inputs = {k: torch.from_numpy(v) for k, v in case.inputs.items()}
        unet = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample.numpy()
    return text, unet


@pytest.mark.parametrize("task", ["ms_to_diffusers", "ms_to_kohya"])
def test_stable_diffusion_pipeline_load_lora_weights_gives_our_outputs(case, task):
    if case.family == SSD1B:
        pytest.skip("SSD-1B is an SDXL pipeline: round trip and merge only (issue 32)")
    exported = case.folder / f"{task}_pipe.safetensors"
    convert(task, case.lora_ckpt, exported, config=str(case.config), overwrite=True)
    pipe = _pipeline(case)
    base_text, base_unet = _theirs(pipe, case)
    pipe.load_lora_weights(str(exported), adapter_name="mb")
    text, unet = _theirs(pipe, case)
    lora_modules = sum(".lora_A." in n for n, _ in pipe.text_encoder.named_parameters())
    assert lora_modules == TEXT_LAYERS[case.family]
    assert relative_error(text, case.text_out) < 1e-4 and relative_error(unet, case.unet_out) < 1e-4
    # the LoRA matters, so a lost alpha or a layer in the wrong place would show
    assert relative_error(base_text, case.text_out) > 1e-2 and relative_error(base_unet, case.unet_out) > 1e-2


# ---------------------------------------------------------------- merge

def _plain_engine(case, weights):
    engine = instantiate_from_config(load_config(case.config).model)
    load_params(engine, weights, strict=True)
    return engine


def test_merged_checkpoint_equals_the_lora_model(case):
    """merge_lora into the family's base checkpoint (the family told by the base itself), and of the kohya export
    with --config: a plain engine on the merged weights gives the LoRA engine's outputs."""
    merged_ckpt = case.folder / "merged.ckpt"
    summary = merge(case.pipe.ckpt, case.lora_ckpt, merged_ckpt, overwrite=True)
    fused = {SD1: 0, SD2: 2, SSD1B: 2}[case.family]  # OpenCLIP layers: q, k, v share one in_proj_weight
    assert summary["merged"] == UNET_LAYERS[case.family] + TEXT_LAYERS[case.family]
    assert summary["weights"] == summary["merged"] - 2 * fused
    merged = {n: t.asnumpy() for n, t in ms.load_checkpoint(str(merged_ckpt)).items()}
    plain = _plain_engine(case, merged)
    # W + s B A summed once in fp32 against the branch computed at every call: rounding apart
    assert relative_error(_ours_unet(plain, case.inputs), case.unet_out) < 1e-4
    assert relative_error(_ours_text(plain, case.ids), case.text_out) < 1e-4
    base = _plain_engine(case, case.base)  # and the merge changed what the LoRA changes
    assert relative_error(_ours_unet(base, case.inputs), case.unet_out) > 1e-2
    assert relative_error(_ours_text(base, case.ids), case.text_out) > 1e-2

    kohya = case.folder / "merge_kohya.safetensors"
    convert("ms_to_kohya", case.lora_ckpt, kohya, config=str(case.config), overwrite=True)
    merge(case.pipe.ckpt, kohya, merged_ckpt, overwrite=True, config=str(case.config))
    again = {n: t.asnumpy() for n, t in ms.load_checkpoint(str(merged_ckpt)).items()}
    for name, value in merged.items():
        np.testing.assert_allclose(again[name], value, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- another family's LoRA

def test_a_lora_of_another_family_is_named_in_one_line(case, capsys):
    other = {SD1: SSD1B, SD2: SD1, SSD1B: SD1}[case.family]
    found = {SD1: "Stable Diffusion 1.x", SD2: "Stable Diffusion 2.x", SSD1B: "SDXL base 1.0 or SSD-1B"}[case.family]
    message = _error(convert, "ms_to_kohya", case.lora_ckpt, case.folder / "never.safetensors",
                     config=str(TINY[other]))
    assert message.startswith(f"{case.lora_ckpt} looks like a LoRA for {found} (")
    assert f"not for {other} ({TINY[other]}): pass --config configs/inference/" in message
    if case.family == SD2:
        assert "text-encoder LoRA on OpenCLIP as the only encoder" in message
    if case.family == SD1:  # the SD 1.5 LoRA against SSD-1B: SSD-1B has no attention at the first level
        assert "attention at the first UNet level" in message
    # without --config (SDXL base assumed) an SD 1.x/2.x LoRA is refused, not written with SDXL's names
    if case.family != SSD1B:
        assert "not for SDXL base 1.0 (the default without --config)" in _error(
            convert, "ms_to_diffusers", case.lora_ckpt, case.folder / "never.safetensors")
    # an exported file read with the wrong family's names: one line, nothing written
    kohya = case.folder / "wrong_family.safetensors"
    convert("ms_to_kohya", case.lora_ckpt, kohya, config=str(case.config), overwrite=True)
    args = ["--task", "to_ms", "--src", str(kohya), "--dst", str(case.folder / "never.ckpt"),
            "--config", str(TINY[other])]
    assert convert_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--config" in err
    if case.family == SSD1B:  # kohya's te2 means a second text encoder, which SD 1.x does not have
        assert re.search(r"text-encoder layers on lora_te[12]_ \(", err) and "Stable Diffusion 1.x has CLIP ViT-L" in err
    assert not (case.folder / "never.ckpt").exists() and not (case.folder / "never.safetensors").exists()


def test_sdxl_lora_with_an_sd15_config_says_what_it_found(tmp_path):
    """The brief's example: an SDXL (tiny) UNet LoRA with the SD 1.5 config."""
    from tools.model_conversion.sdxl_layout import rule_mindspore_shapes

    rng = np.random.default_rng(0)
    state = {}
    for name, shape in rule_mindspore_shapes(TINY_CONFIG).items():
        if name.startswith("model.") and name.endswith((".to_q.weight", ".to_out.0.weight")):
            out, inputs = shape
            state[name.replace(".weight", ".lora_A.weight")] = rng.standard_normal((RANK, inputs)).astype(np.float32)
            state[name.replace(".weight", ".lora_B.weight")] = rng.standard_normal((out, RANK)).astype(np.float32)
    src = tmp_path / "sdxl_lora.ckpt"
    write_ckpt(state, src)
    message = _error(convert, "ms_to_kohya", src, tmp_path / "out.safetensors", config=str(TINY[SD1]))
    assert message.startswith(f"{src} looks like a LoRA for SDXL base 1.0 (")  # middle-block attention: not SSD-1B
    assert "more than one transformer per block" in message or "deepest up level" in message
    assert message.endswith(f"not for Stable Diffusion 1.x ({TINY[SD1]}): pass --config "
                            "configs/inference/sd_xl_base.yaml")
    convert("ms_to_kohya", src, tmp_path / "out.safetensors", config=str(TINY_CONFIG))  # its own config: fine
    assert read_state(tmp_path / "out.safetensors")[1]["ss_base_model_version"] == "sdxl_base_v1-0"

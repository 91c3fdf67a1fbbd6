"""DeepFloyd IF DreamBooth-LoRA export (issue 33): a MindBooth IF LoRA goes to diffusers' IF LoRA format and back,
merges into the IF base, and diffusers' own `IFPipeline.load_lora_weights` renders the image MindBooth renders.

The tiny stage I of tests/test_if_pipeline.py (random diffusers UNet, its weights as a MindBooth checkpoint) is the
base on both sides. The MindBooth engine comes from the IF training YAML (LoRA on to_q/to_k/to_v/to_out.0/add_k_proj/
add_v_proj of every `attentions.N`), with random A and B (what a trained LoRA is), saved as the trainer saves it.
"""
import copy
import json

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_if_lora_training import TARGETS, TRAINING
from test_if_pipeline import STAGE_ONE, assert_images_close, if_scheduler, shared_noise, tiny_if  # noqa: F401
from test_unet import relative_error

from conftest import TINY_CONFIG
from gm.modules.lora import is_lora_name
from gm.util import instantiate_from_config
from mindbooth import checkpoint, if_cascade
from mindbooth.config import load_config
from mindbooth.tensor_dtypes import ConversionError
from tools.lora_conversion import lora_formats as lf
from tools.lora_conversion.convert_lora import convert, main as convert_main, read_state, write_ckpt
from tools.lora_conversion.merge_lora import merge

ALPHA = 8.0  # the YAML's alpha equals its rank (scale 1); another alpha here, so a lost alpha would show
STEPS, GUIDANCE, SIZE, SEED = 4, 7.0, 16, 7


class Case:
    """The LoRA engine (training YAML, tiny IF base, random LoRA), its saved LoRA and its stage-I render."""

    def __init__(self, tiny_if, folder):  # noqa: F811
        self.tiny_if, self.folder = tiny_if, folder
        config = load_config(TRAINING)
        params = config.model.params
        params.conditioner_config = "__is_unconditional__"  # as if_cascade.load_stage: embeddings come from outside
        params.lora_config.alpha = ALPHA
        self.rank = int(params.lora_config.rank)
        self.engine = instantiate_from_config(config.model)
        checkpoint.load_weights(self.engine, [tiny_if["weights"][0]], skip_prefixes=("conditioner.",))
        rng = np.random.default_rng(11)
        self.lora = {}
        for name, param in self.engine.parameters_and_names():
            if is_lora_name(name):  # A at peft's init scale, B non-zero: B A a few times the base weights' size,
                # so the LoRA moves the image by about 46/255 on average
                std = 1.0 / np.sqrt(param.shape[1]) if ".lora_A." in name else 0.5
                self.lora[name] = (rng.standard_normal(param.shape) * std).astype(np.float32)
                param.set_data(ms.Tensor(self.lora[name]))
        self.layers = len(self.lora) // 2
        self.lora_ckpt = folder / "if_lora.ckpt"
        checkpoint.save_lora(self.engine, self.lora_ckpt, self.rank, ALPHA)
        width = params.network_config.params.encoder_hid_dim
        self.embeds = rng.standard_normal((2, 77, width)).astype(np.float32)
        self.negative = rng.standard_normal((2, 77, width)).astype(np.float32)
        self.image = if_cascade.sample_stage(self.engine, self.embeds, self.negative, SIZE, shared_noise(SEED),
                                             STEPS, GUIDANCE)


@pytest.fixture(scope="module")
def case(tiny_if, tmp_path_factory):  # noqa: F811
    return Case(tiny_if, tmp_path_factory.mktemp("if_lora"))


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def diffusers_stage_one(case, monkeypatch, lora=None):
    """diffusers' IFPipeline (stage I) on a copy of the base UNet, with `lora` loaded by load_lora_weights, on the
    case's embeddings and noise; returns (images in [-1, 1], the pipeline)."""
    import diffusers.pipelines.deepfloyd_if.pipeline_if as stage_one_module
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from diffusers import IFPipeline

    noise = shared_noise(SEED)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise(shape))

    for module in (stage_one_module, ddpm_module):
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    pipe = IFPipeline(unet=copy.deepcopy(case.tiny_if["unets"][0]), scheduler=if_scheduler(1.5), tokenizer=None,
                      text_encoder=None, safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="mindbooth")
    with torch.no_grad():
        images = pipe(prompt_embeds=torch.tensor(case.embeds), negative_prompt_embeds=torch.tensor(case.negative),
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                      output_type="pt").images
    return images.numpy(), pipe


def test_ifpipeline_load_lora_weights_renders_our_lora_image(case, monkeypatch):
    exported = case.folder / "pytorch_lora_weights.safetensors"
    summary = convert("ms_to_diffusers", case.lora_ckpt, exported, config=str(TRAINING), overwrite=True)
    assert summary["layers"] == case.layers and (summary["rank"], summary["alpha"]) == (str(case.rank), repr(ALPHA))
    theirs, pipe = diffusers_stage_one(case, monkeypatch, exported)
    wrapped = {n.rsplit(".lora_A.", 1)[0] for n, _ in pipe.unet.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == case.layers and {n.rsplit(".", 1)[-1] for n in wrapped} >= {"add_k_proj", "add_v_proj"}
    assert_images_close(case.image, theirs)
    base, _ = diffusers_stage_one(case, monkeypatch)
    # the LoRA changes the image far beyond the tolerance, so a lost layer or alpha would fail the comparison
    assert np.abs(base - case.image).mean() / 2 > 20 / 255
    assert (np.abs(case.image) < 0.99).mean() > 0.25 and case.image.std() > 0.1  # neither flat nor all clipped


def test_export_names_header_and_round_trip(case):
    exported = case.folder / "names.safetensors"
    convert("ms_to_diffusers", case.lora_ckpt, exported, config=str(STAGE_ONE), instance_prompt="a sks dog")
    with safe_open(str(exported), "np") as f:
        meta, keys = f.metadata(), set(f.keys())
    # IF's names are diffusers' in MindBooth too: the prefix is all that changes
    assert keys == {"unet." + n[len(lf.MINDBOOTH_PREFIX):] for n in case.lora}
    assert "unet.down_blocks.1.attentions.0.add_k_proj.lora_A.weight" in keys
    assert "unet.mid_block.attentions.0.to_out.0.lora_B.weight" in keys
    adapter = json.loads(meta[lf.LORA_ADAPTER_METADATA_KEY])
    assert adapter["unet.r"] == case.rank and adapter["unet.lora_alpha"] == ALPHA
    assert {t.rsplit(".", 1)[-1] for t in adapter["unet.target_modules"]} == {"to_q", "to_k", "to_v", "0", "add_k_proj",
                                                                               "add_v_proj"}
    attentions = sum(".to_q.lora_A." in n for n in case.lora)
    assert len(adapter["unet.target_modules"]) == case.layers == len(TARGETS) * attentions
    assert meta["base_model"] == "DeepFloyd/IF-I-XL-v1.0" and meta["instance_prompt"] == "a sks dog"
    # without --config the family comes from the names: the same file
    unnamed = case.folder / "no_config.safetensors"
    convert("ms_to_diffusers", case.lora_ckpt, unnamed)
    (without, header), (state, _) = read_state(unnamed), read_state(exported)
    assert set(without) == set(state) and all(np.array_equal(without[k], state[k]) for k in state)
    assert header[lf.LORA_ADAPTER_METADATA_KEY] == meta[lf.LORA_ADAPTER_METADATA_KEY]
    for config in (str(STAGE_ONE), None):  # and back, bit for bit
        back = case.folder / "back.ckpt"
        summary = convert("to_ms", exported, back, config=config, overwrite=True)
        assert summary["format"] == "diffusers" and summary["layers"] == case.layers
        loaded = {n: t.asnumpy() for n, t in ms.load_checkpoint(str(back)).items()}
        assert set(loaded) == set(case.lora) | {"lora_rank", "lora_alpha"} and float(loaded["lora_alpha"]) == ALPHA
        for name, value in case.lora.items():
            np.testing.assert_array_equal(loaded[name], value)
    # the older attention-processor names (IF's LoRAAttnAddedKVProcessor: add_k_proj_lora, to_out_lora) read alike
    legacy = {}
    for key, value in state.items():
        module, _, part = key.rpartition(".lora_")
        attention, _, projection = module.rpartition(".")
        attention = attention.removesuffix(".to_out") if projection == "0" else attention
        projection = "to_out" if projection == "0" else projection
        legacy[f"{attention}.processor.{projection}_lora.{'down' if part == 'A.weight' else 'up'}.weight"] = value
    layers = lf.from_diffusers(legacy)
    assert len(layers) == case.layers
    assert np.array_equal(layers["down_blocks.1.attentions.0.add_v_proj"].up,
                          state["unet.down_blocks.1.attentions.0.add_v_proj.lora_B.weight"])


def test_merge_into_the_if_base_equals_the_lora_engine(case):
    """merge_lora into the tiny IF base (IF told by the base's names): the plain stage-I engine on the merged
    weights gives the LoRA engine's UNet output, from the MindBooth .ckpt and from the diffusers export alike."""
    merged = case.folder / "merged.ckpt"
    summary = merge(case.tiny_if["weights"][0], case.lora_ckpt, merged, overwrite=True)
    assert summary["merged"] == summary["weights"] == case.layers
    rng = np.random.default_rng(3)
    x = ms.Tensor(rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
    t, context = ms.Tensor(np.array([900, 20], np.int64)), ms.Tensor(case.embeds)
    case.engine.set_train(False)
    expected = case.engine.model.diffusion_model(x, t, context).asnumpy()
    plain = if_cascade.load_stage(STAGE_ONE, merged)
    assert relative_error(plain.model.diffusion_model(x, t, context).asnumpy(), expected) < 1e-4
    # W + (alpha / rank) B A on an added-key projection (the LoRA moves the output: see the render test)
    base, after = read_state(case.tiny_if["weights"][0])[0], read_state(merged)[0]
    layer = lf.MINDBOOTH_PREFIX + "up_blocks.0.attentions.0.add_k_proj"
    delta = ALPHA / case.rank * case.lora[f"{layer}.lora_B.weight"] @ case.lora[f"{layer}.lora_A.weight"]
    np.testing.assert_allclose(after[f"{layer}.weight"] - base[f"{layer}.weight"], delta, rtol=1e-4, atol=1e-6)
    exported = case.folder / "merge_diffusers.safetensors"
    convert("ms_to_diffusers", case.lora_ckpt, exported, config=str(STAGE_ONE), overwrite=True)
    again = case.folder / "merged_again.ckpt"
    merge(case.tiny_if["weights"][0], exported, again)
    first, second = read_state(merged)[0], read_state(again)[0]
    assert set(first) == set(second)
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value)


def test_kohya_and_another_familys_lora_are_refused_in_one_line(case, tmp_path, capsys):
    never = tmp_path / "never.safetensors"
    message = _error(convert, "ms_to_kohya", case.lora_ckpt, never, config=str(STAGE_ONE))
    assert message.startswith("DeepFloyd IF LoRA has no kohya (A1111/ComfyUI) format") and "ms_to_diffusers" in message
    assert _error(convert, "ms_to_kohya", case.lora_ckpt, never) == message  # told by the names alone
    # the IF LoRA with an SDXL config, and an SDXL LoRA with the IF config
    message = _error(convert, "ms_to_diffusers", case.lora_ckpt, never, config=str(TINY_CONFIG))
    assert message.startswith(f"{case.lora_ckpt} looks like a LoRA for DeepFloyd IF (DeepFloyd IF attention names (")
    assert message.endswith("pass --config configs/inference/if_i_xl.yaml")
    from tools.model_conversion.sdxl_layout import rule_mindspore_shapes

    rng = np.random.default_rng(0)
    sdxl = {}
    for name, (out, inputs) in ((n, s) for n, s in rule_mindspore_shapes(TINY_CONFIG).items()
                                if n.startswith("model.") and n.endswith(".attn1.to_q.weight")):
        sdxl[name.replace(".weight", ".lora_A.weight")] = rng.standard_normal((4, inputs)).astype(np.float32)
        sdxl[name.replace(".weight", ".lora_B.weight")] = rng.standard_normal((out, 4)).astype(np.float32)
    sdxl_lora = tmp_path / "sdxl_lora.ckpt"
    write_ckpt(sdxl, sdxl_lora)
    args = ["--task", "ms_to_diffusers", "--src", str(sdxl_lora), "--dst", str(never), "--config", str(STAGE_ONE)]
    assert convert_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {sdxl_lora} looks like a LoRA for ") and "\n" not in err
    assert f"not for DeepFloyd IF ({STAGE_ONE})" in err and "DeepFloyd IF (" not in err.split(", not for")[0]
    message = _error(merge, case.tiny_if["weights"][0], sdxl_lora, tmp_path / "never.ckpt")
    assert "not for DeepFloyd IF" in message
    assert not never.exists() and not (tmp_path / "never.ckpt").exists()

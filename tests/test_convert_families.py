"""Weight converter for SD 1.x, SD 2.x and SSD-1B (issue 32), beside SDXL base (tests/test_convert_weight.py).

For each family a tiny random pipeline is built with diffusers/transformers at the sizes of the tiny config and
saved as diffusers does; it is converted through the diffusers-folder path, exported to the official single file,
and converted back through the single-file path. The official file is checked against diffusers' own LDM -> diffusers
conversion (`diffusers.loaders.single_file_utils`), an independent reading of the official layout. Full-size names
and shapes are checked with sparse files (header only) against the full-size models.
"""
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore.nn.utils import no_init_parameters

from conftest import ROOT
from family_models import CONFIGS, TINY, Converted
from gm.util import instantiate_from_config, load_params
from mindbooth.ckpt_stream import CkptReader
from mindbooth.tensor_dtypes import ConversionError
from tools.model_conversion import conversion
from tools.model_conversion.file_layout import (FAMILIES, SD1, SD2, SDXL, SSD1B, config_family, detect,
                                                official_file_shapes)
from tools.model_conversion.make_random_sdxl import random_finite, write_random
from tools.model_conversion.safetensors_stream import SafetensorsReader, TensorInfo, header_bytes, write_order
from tools.model_conversion.sdxl_layout import load_config, model_mindspore_shapes, rule_mindspore_shapes

CLI = ROOT / "tools" / "model_conversion" / "convert_weight.py"
FULL = {"sd_v1.5": SD1, "sd_v2.1": SD2, "sd_v2.1_base": SD2, "ssd_1b": SSD1B}
SD2_TEXT = "cond_stage_model.model."


@pytest.fixture(scope="module", params=list(TINY), ids=["sd1", "sd2", "ssd1b"])
def converted(request, tmp_path_factory):
    return Converted(request.param, tmp_path_factory.mktemp(request.param.replace(" ", "_")))


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def _state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def sparse_safetensors(path, shapes, code="F16"):
    """Full-size names and shapes with a hole for the data (no disk)."""
    infos = write_order([TensorInfo(n, code, tuple(s)) for n, s in shapes.items()])
    with open(path, "wb") as f:
        f.write(header_bytes(infos))
        f.truncate(f.tell() + sum(i.nbytes for i in infos))
    return path


# ------------------------------------------------------------------ layout rules = the models
@pytest.mark.parametrize("config", [*TINY.values(), *(CONFIGS / f"{n}.yaml" for n in FULL)],
                         ids=lambda c: c.stem)
def test_rule_layout_is_the_models_and_names_its_family(config):
    from tools.model_conversion.keymap import official_to_mindspore_names
    from tools.model_conversion.sdxl_layout import official_shapes

    rule = official_shapes(load_config(config)["model"]["params"])
    renamed = official_to_mindspore_names(rule)
    model = model_mindspore_shapes(config)
    assert {renamed[n]: tuple(s) for n, s in rule.items()} == model == rule_mindspore_shapes(config)
    family = {**{c.stem: f for f, c in TINY.items()}, **FULL}[config.stem]
    assert config_family(config) == family
    assert detect(official_file_shapes(load_config(config)["model"]["params"])) == family


# ------------------------------------------------------------------ tiny: both paths, one checkpoint
def test_diffusers_folder_and_official_file_give_the_same_checkpoint(converted):
    with CkptReader(converted.ckpt) as a, CkptReader(converted.back) as b:
        assert a.shapes() == b.shapes() == converted.expected
        for name in a.tensors:
            assert np.array_equal(a.read(name), b.read(name)), name
    assert converted.note == ""  # the exported file holds only what the model has


def test_checkpoint_loads_strictly_with_the_diffusers_values(converted):
    params = ms.load_checkpoint(str(converted.ckpt))
    with no_init_parameters():
        model = instantiate_from_config(load_config(converted.config)["model"], backend="plain")
    load_params(model, params, strict=True)  # every name, every shape
    unet = converted.parts["unet"].state_dict()
    u = "model.diffusion_model."
    # SD 1.x projects with 1x1 convs, SD 2.x/SSD-1B with Linear: the weight keeps its shape either way
    proj = "down_blocks.1.attentions.0.proj_in.weight"
    assert np.array_equal(params[u + "input_blocks.4.1.proj_in.weight"].asnumpy(), unet[proj].numpy())
    if converted.family == SSD1B:  # per-block depth and the one middle ResBlock
        assert np.array_equal(params[u + "input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight"].asnumpy(),
                              unet["down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight"].numpy())
        assert np.array_equal(params[u + "middle_block.0.in_layers.2.weight"].asnumpy(),
                              unet["mid_block.resnets.0.conv1.weight"].numpy())
    if converted.family == SD2:  # OpenCLIP ViT-H: q, k, v fused as open_clip stores them
        layer = converted.parts["text_encoder"].encoder.layers[1].self_attn  # transformers >= 5: no .text_model
        fused = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]).detach().numpy()
        name = "conditioner.embedders.0.model.transformer.resblocks.1.attn.in_proj_weight"
        assert np.array_equal(params[name].asnumpy(), fused)


def test_official_file_is_what_diffusers_reads_as_the_official_layout(converted):
    """diffusers' own LDM -> diffusers conversion of the exported file gives back every tensor of the pipeline."""
    from diffusers.loaders import single_file_utils as sf

    state = _state(converted.official)
    unet, vae = converted.parts["unet"], converted.parts["vae"]
    text = converted.parts["text_encoder"]
    got = {"unet": sf.convert_ldm_unet_checkpoint(state, unet.config),
           "vae": sf.convert_ldm_vae_checkpoint(state, vae.config)}
    if converted.family == SD2:
        got["text_encoder"] = sf.convert_open_clip_checkpoint(text, state, prefix=SD2_TEXT)
    else:
        got["text_encoder"] = sf.convert_ldm_clip_checkpoint(state)
    if converted.family == SSD1B:
        got["text_encoder_2"] = sf.convert_open_clip_checkpoint(converted.parts["text_encoder_2"], state,
                                                                prefix="conditioner.embedders.1.model.")
    def plain(state):  # transformers >= 5 names its CLIP text model's parameters without the `text_model.` prefix
        return {n.removeprefix("text_model."): t for n, t in state.items() if not n.endswith("position_ids")}

    for part, mapped in got.items():
        want, mapped = plain(converted.parts[part].state_dict()), plain(mapped)
        assert sorted(mapped) == sorted(want), part
        for name, tensor in want.items():
            assert torch.equal(mapped[name].reshape(tensor.shape), tensor), (part, name)


def test_official_round_trip_is_exact(converted, tmp_path):
    again = tmp_path / "again.safetensors"
    conversion.mindspore_to_official(converted.back, again, converted.expected, progress=False)
    assert again.read_bytes() == converted.official.read_bytes()


def test_official_file_has_the_released_names(converted):
    with SafetensorsReader(converted.official) as reader:
        names = set(reader.tensors)
    assert names == set(official_file_shapes(load_config(converted.config)["model"]["params"]))
    text = {SD1: "cond_stage_model.transformer.text_model.", SD2: SD2_TEXT,
            SSD1B: "conditioner.embedders.1.model."}[converted.family]
    assert any(n.startswith(text) for n in names) and detect(dict.fromkeys(names, (1,))) == converted.family
    if converted.family == SD2:  # what the model has: no unused last block, no projection
        assert SD2_TEXT + "transformer.resblocks.2.ln_1.weight" not in names
        assert SD2_TEXT + "text_projection" not in names and SD2_TEXT + "logit_scale" not in names


def test_fp16_variant_folder_converts_to_the_same_values(converted, tmp_path):
    folder = tmp_path / "fp16"
    for name, model in converted.parts.items():
        model.half().save_pretrained(folder / name, variant="fp16")
        model.float()
    out = tmp_path / "fp16.ckpt"
    message = _error(conversion.diffusers_to_mindspore, folder, out, converted.expected, progress=False)
    assert "pass --variant" in message
    conversion.diffusers_to_mindspore(folder, out, converted.expected, variant="fp16", progress=False)
    with CkptReader(out) as half, CkptReader(converted.ckpt) as full:
        name = "model.diffusion_model.out.2.weight"
        assert np.array_equal(half.read(name), full.read(name).astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------ released files: what is skipped
def _with_extras(src, dst, extras: dict):
    """`src` plus tensors {name: (code, shape)} a released file has beyond the model's."""
    rng = np.random.default_rng(5)
    with SafetensorsReader(src) as reader:
        shapes = {n: (t.dtype, t.shape) for n, t in reader.tensors.items()}
        data = {n: reader.read(n) for n in reader.tensors}
    shapes.update(extras)
    for name, (code, shape) in extras.items():
        data[name] = (np.zeros(shape, np.int64) if code == "I64" else np.zeros(shape, np.int32) if code == "I32"
                      else random_finite(shape, code, rng))
    from tools.model_conversion.safetensors_stream import write_safetensors

    with open(dst, "wb") as f:
        write_safetensors(f, [TensorInfo(n, c, tuple(s)) for n, (c, s) in shapes.items()], data.__getitem__)
    return dst


def _ddpm_buffers():
    names = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
             "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
             "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]
    return {n: ("F32", (1000,)) for n in names}


def test_non_pruned_sd1_file_skips_ema_and_buffers_with_one_note(tmp_path):
    """A non-pruned SD 1.5 file also holds model_ema.* (flattened names, with int counters), the DDPM buffers
    and position_ids (int64): the same checkpoint comes out, with a note that counts them."""
    expected = model_mindspore_shapes(TINY[SD1])
    pruned = tmp_path / "pruned.safetensors"
    write_random(pruned, official_file_shapes(load_config(TINY[SD1])["model"]["params"]), "fp16", seed=2)
    with SafetensorsReader(pruned) as reader:
        unet = {n: t for n, t in reader.tensors.items() if n.startswith("model.diffusion_model.")}
    extras = {"model_ema." + "".join(n.split(".")[1:]): ("F16", t.shape) for n, t in unet.items()}
    extras.update({"model_ema.decay": ("F32", ()), "model_ema.num_updates": ("I32", ()),
                   "cond_stage_model.transformer.text_model.embeddings.position_ids": ("I64", (1, 77)),
                   **_ddpm_buffers()})
    full = _with_extras(pruned, tmp_path / "full.safetensors", extras)
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    assert conversion.official_to_mindspore(pruned, a, expected, progress=False)["note"] == ""
    note = conversion.official_to_mindspore(full, b, expected, progress=False)["note"]
    assert a.read_bytes() == b.read_bytes()
    n_ema = len(unet) + 2
    assert note == (f"skipped {n_ema + 13} tensors no model parameter takes: {n_ema} model_ema.* (the EMA copy of "
                    "the UNet); 12 DDPM schedule buffers (the model computes them from its config); "
                    "1 position_ids (CLIP's 0..76 index buffer)") and "\n" not in note


def test_released_sd2_file_skips_the_unused_open_clip_parts(tmp_path):
    """SD 2.x's file holds the whole OpenCLIP ViT-H tower; the model has the layers it uses (one fewer) and no
    projection."""
    expected = model_mindspore_shapes(TINY[SD2])
    used = tmp_path / "used.safetensors"
    shapes = official_file_shapes(load_config(TINY[SD2])["model"]["params"])
    write_random(used, shapes, "fp16", seed=3)
    block = SD2_TEXT + "transformer.resblocks.1."  # the tiny tower's last used block; the released one has .2
    extras = {n.replace(".resblocks.1.", ".resblocks.2."): ("F16", s) for n, s in shapes.items() if n.startswith(block)}
    extras.update({SD2_TEXT + "text_projection": ("F16", (64, 64)), SD2_TEXT + "logit_scale": ("F16", ())})
    released = _with_extras(used, tmp_path / "released.safetensors", extras)
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    conversion.official_to_mindspore(used, a, expected, progress=False)
    note = conversion.official_to_mindspore(released, b, expected, progress=False)["note"]
    assert a.read_bytes() == b.read_bytes()
    assert note.startswith(f"skipped {len(extras)} tensors no model parameter takes: {len(extras)} of the OpenCLIP "
                           "tower SD 2.x does not use (its last block")
    # without text_projection the file is not the released tower: an extra block is an error, not skipped
    del extras[SD2_TEXT + "text_projection"]
    odd = _with_extras(used, tmp_path / "odd.safetensors", extras)
    message = _error(conversion.official_to_mindspore, odd, tmp_path / "c.ckpt", expected, progress=False)
    assert "unexpected (first: cond_stage_model.model.transformer.resblocks.2." in message


# ------------------------------------------------------------------ wrong family: one line naming both
@pytest.mark.parametrize("file_family,config_family_", [(SD2, SD1), (SD1, SSD1B), (SSD1B, SD2)])
def test_a_file_of_another_family_names_both_and_the_config(tmp_path, file_family, config_family_):
    src = tmp_path / "other.safetensors"
    write_random(src, official_file_shapes(load_config(TINY[file_family])["model"]["params"]), "fp16")
    expected = model_mindspore_shapes(TINY[config_family_])
    want = f"{src} looks like {file_family}, not {config_family_}: pass --config {FAMILIES[file_family]}"
    assert _error(conversion.official_to_mindspore, src, tmp_path / "o.ckpt", expected, progress=False) == want
    # before any writing when only the family is known (the command line, while the model is built)
    called = []
    assert _error(conversion.official_to_mindspore, src, tmp_path / "o.ckpt", lambda: called.append(1) or expected,
                  progress=False, family=config_family_) == want
    assert not called and not (tmp_path / "o.ckpt").exists()


def test_a_diffusers_folder_of_another_family_is_named(converted, tmp_path):
    other = {SD1: SD2, SD2: SSD1B, SSD1B: SD1}[converted.family]
    message = _error(conversion.diffusers_to_mindspore, converted.folder, tmp_path / "o.ckpt",
                     model_mindspore_shapes(TINY[other]), progress=False)
    assert message == (f"{converted.folder} looks like {converted.family}, not {other}: "
                       f"pass --config {FAMILIES[converted.family]}")


def test_command_line_names_the_config_to_pass(tmp_path):
    src = tmp_path / "sd2.safetensors"
    write_random(src, official_file_shapes(load_config(TINY[SD2])["model"]["params"]), "fp16")
    done = subprocess.run([sys.executable, str(CLI), "--task", "pt_to_ms", "--config", str(TINY[SD1]), "--no_progress",
                           "--weight_safetensors", str(src), "--weight_ms", str(tmp_path / "o.ckpt")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == (
        f"error: {src} looks like Stable Diffusion 2.x, not Stable Diffusion 1.x: pass --config "
        "configs/inference/sd_v2.1.yaml (768-v) or configs/inference/sd_v2.1_base.yaml (512)")
    assert not (tmp_path / "o.ckpt").exists()


def test_detect_names_the_families_and_sdxl_apart_from_ssd1b():
    for config, family in ((CONFIGS / "sd_xl_tiny.yaml", SDXL), *((c, f) for f, c in TINY.items())):
        assert detect(official_file_shapes(load_config(config)["model"]["params"])) == family
    partial = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
               "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}
    assert detect(partial) == "a partial Stable Diffusion 1.x checkpoint (only CLIP ViT-L, VAE)"


# ------------------------------------------------------------------ full size: names and shapes
@pytest.mark.parametrize("name", list(FULL))
def test_full_size_key_list_loads_into_the_full_size_model(tmp_path, name):
    """The full-size names and shapes the config implies, as the released file has them (with its extras), pass
    every check against the full-size model and each lands on one of its parameters (a sparse file)."""
    config = CONFIGS / f"{name}.yaml"
    shapes = official_file_shapes(load_config(config)["model"]["params"])
    if FULL[name] == SD1:
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    if FULL[name] == SD2:  # the released tower: 24 blocks, projection, logit scale
        last = SD2_TEXT + "transformer.resblocks.22."
        shapes.update({n.replace(".22.", ".23."): s for n, s in shapes.items() if n.startswith(last)})
        shapes.update({SD2_TEXT + "text_projection": (1024, 1024), SD2_TEXT + "logit_scale": ()})
    src = sparse_safetensors(tmp_path / "full.safetensors", shapes)
    expected = model_mindspore_shapes(config)
    plan = conversion.official_to_mindspore(src, tmp_path / "o.ckpt", expected, check_only=True)
    assert sorted(plan["names"]) == sorted(expected)
    assert bool(plan["note"]) == (FULL[name] != SSD1B)  # SD 1.x/2.x: the released extras were skipped

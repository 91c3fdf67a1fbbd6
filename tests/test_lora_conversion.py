"""LoRA tools: MindBooth .ckpt <-> diffusers/PEFT and kohya safetensors, checked against diffusers' own loaders
and converters on identical weights; merging a LoRA into a base checkpoint. UNet LoRA and text-encoder LoRA
(CLIP-L and bigG, `--train_text_encoder`)."""
import copy
import json
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore.nn.utils import no_init_parameters
from safetensors import safe_open

from conftest import BASE_CONFIG, SHARED, TINY_CONFIG
from gm.modules.lora import inject_lora, is_lora_name, lora_layers, lora_parameters
from gm.util import instantiate_from_config, load_params
from mindbooth.checkpoint import save_lora
from mindbooth.config import load_config
from mindbooth.tensor_dtypes import ConversionError
from mindbooth.tiny_model import random_weights
from gm.backends import resolve_backend
from test_text_encoders import build_models, token_sets
from test_unet import (
    _diffusers_forward_with_emb, _Holder, build_unet, load_diffusers_unet_into_ours, relative_error, run_ours,
    tiny_diffusers_unet,
)
from tools.lora_conversion import lora_formats as lf
from tools.lora_conversion import text_encoder_names as te_names
from tools.lora_conversion.convert_lora import convert, main as convert_main, read_state, write_safetensors
from tools.lora_conversion.merge_lora import merge
from tools.model_conversion.diffusers_unet import diffusers_name_to_official

LORA_KEYS = SHARED / "reference" / "sdxl_keys" / "mindone" / "lora_conversion"
RANK, ALPHA = 4, 8.0


def _save_mindbooth(params: dict, path, rank=RANK, alpha=ALPHA):
    """As the trainer writes a LoRA: ms.save_checkpoint of the LoRA weights + fp32 `lora_rank`/`lora_alpha`."""
    entries = [{"name": k, "data": ms.Tensor(np.asarray(v))} for k, v in params.items()]
    for key, value in (("lora_rank", rank), ("lora_alpha", alpha)):
        entries.append({"name": key, "data": ms.Tensor(np.array(value, np.float32))})
    ms.save_checkpoint(entries, str(path))


def _diffusers_run(model, inputs):
    with torch.no_grad():
        x, t = torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["t"])
        emb = model.time_embedding(model.get_time_embed(sample=x, timestep=t))
        emb = emb + model.add_embedding(torch.from_numpy(inputs["y"]))
        return _diffusers_forward_with_emb(model, x, emb, torch.from_numpy(inputs["context"])).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny diffusers UNet and ours on the same weights, ours with a rank-4 alpha-8 LoRA (random A and B)
    saved as a MindBooth checkpoint, and the outputs with and without the LoRA."""
    folder = tmp_path_factory.mktemp("lora")
    reference = tiny_diffusers_unet(load_config(TINY_CONFIG))
    holder = _Holder(build_unet(TINY_CONFIG))
    unet = holder.model.diffusion_model
    load_diffusers_unet_into_ours(reference, unet)
    base = {n: p.asnumpy().copy() for n, p in holder.parameters_and_names()}
    rng = np.random.default_rng(0)
    inputs = dict(  # one small sample: PyNative runs cost ~4 s each whatever the size
        x=rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        t=np.array([617.0], np.float32),
        context=rng.standard_normal((1, 77, 96)).astype(np.float32),
        y=rng.standard_normal((1, 1584)).astype(np.float32),
    )
    base_out = run_ours(unet, inputs)
    inject_lora(holder, rank=RANK, alpha=ALPHA)
    for name, param in lora_parameters(holder).items():
        param.set_data(ms.Tensor((rng.standard_normal(param.shape) * 0.1).astype(np.float32)))
    lora = {n: p.asnumpy().copy() for n, p in lora_parameters(holder).items()}
    lora_out = run_ours(unet, inputs)
    lora_ckpt = folder / "lora.ckpt"
    _save_mindbooth(lora, lora_ckpt)
    return SimpleNamespace(folder=folder, reference=reference, holder=holder, base=base, lora=lora, inputs=inputs,
                           base_out=base_out, lora_out=lora_out, lora_ckpt=lora_ckpt)


def test_tiny_fixture_lora_changes_the_output(tiny):
    assert len(lora_layers(tiny.holder)) == 136 and len(tiny.lora) == 272
    assert relative_error(tiny.lora_out, tiny.base_out) > 1e-2  # so a lost or wrong alpha would show below


# ---------------------------------------------------------------- 1. export -> import is the identity

@pytest.mark.parametrize("task", ["ms_to_diffusers", "ms_to_kohya"])
def test_export_then_import_is_bit_identical(tiny, task):
    exported = tiny.folder / f"{task}.safetensors"
    convert(task, tiny.lora_ckpt, exported, base_model="sdxl-tiny", instance_prompt="a photo of sks dog",
            overwrite=True)
    back = tiny.folder / f"{task}_back.ckpt"
    summary = convert("to_ms", exported, back, overwrite=True)
    assert summary["format"] == task[len("ms_to_"):] and summary["layers"] == 136
    loaded = ms.load_checkpoint(str(back))  # MindSpore itself reads what we wrote
    assert set(loaded) == set(tiny.lora) | {"lora_rank", "lora_alpha"}
    for name, value in tiny.lora.items():
        assert loaded[name].dtype == ms.float32
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)
    assert float(loaded["lora_rank"].asnumpy()) == RANK and float(loaded["lora_alpha"].asnumpy()) == ALPHA

    with safe_open(str(exported), "np") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["lora_rank"] == "4" and meta["lora_alpha"] == "8.0" and meta["base_model"] == "sdxl-tiny"
    assert meta["instance_prompt"] == "a photo of sks dog"
    if task == "ms_to_kohya":
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in keys
    else:
        config = json.loads(meta[lf.LORA_ADAPTER_METADATA_KEY])
        assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8.0
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys


# ---------------------------------------------------------------- 2. diffusers' own loaders agree with our UNet

def _assert_diffusers_matches(tiny, model):
    out = _diffusers_run(model, tiny.inputs)
    assert relative_error(out, tiny.lora_out) < 1e-4
    assert relative_error(out, tiny.base_out) > 1e-2


def test_diffusers_peft_file_loads_into_diffusers_unet_with_same_output(tiny):
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXLLoader

    exported = tiny.folder / "peft.safetensors"
    convert("ms_to_diffusers", tiny.lora_ckpt, exported, overwrite=True)
    # the bare model's loader (reads alpha from the header when told the file is safetensors)
    model = copy.deepcopy(tiny.reference)
    model.load_lora_adapter(str(exported), prefix="unet", adapter_name="mb", use_safetensors=True)
    assert model.peft_config["mb"].lora_alpha == ALPHA and model.peft_config["mb"].r == RANK
    _assert_diffusers_matches(tiny, model)
    # what StableDiffusionXLPipeline.load_lora_weights does for its UNet
    model = copy.deepcopy(tiny.reference)
    state, alphas, metadata = SDXLLoader.lora_state_dict(str(exported), unet_config=model.config,
                                                         return_lora_metadata=True)
    SDXLLoader.load_lora_into_unet(state, alphas, unet=model, metadata=metadata)
    _assert_diffusers_matches(tiny, model)


def test_folded_alpha_file_is_right_even_where_diffusers_ignores_the_header(tiny):
    exported = tiny.folder / "peft_folded.safetensors"
    convert("ms_to_diffusers", tiny.lora_ckpt, exported, overwrite=True, fold_alpha=True)
    model = copy.deepcopy(tiny.reference)
    model.load_lora_adapter(str(exported), prefix="unet")  # no use_safetensors: alpha = rank assumed
    _assert_diffusers_matches(tiny, model)


def test_kohya_file_loads_through_diffusers_sdxl_lora_loader_with_same_output(tiny):
    """diffusers reads kohya SDXL files (sgm names, .alpha) in the SDXL pipeline's loader, whose class methods
    take a bare UNet: the same path `pipe.load_lora_weights` takes."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXLLoader

    exported = tiny.folder / "kohya.safetensors"
    convert("ms_to_kohya", tiny.lora_ckpt, exported, overwrite=True)
    model = copy.deepcopy(tiny.reference)
    state, alphas = SDXLLoader.lora_state_dict(str(exported), unet_config=model.config)
    assert set(alphas.values()) == {ALPHA}
    SDXLLoader.load_lora_into_unet(state, alphas, unet=model)
    _assert_diffusers_matches(tiny, model)


def test_mixed_ranks_and_alphas_reach_peft_with_the_right_per_layer_delta(tiny):
    """A LoRA with per-layer ranks/alphas (as kohya files may have) -> MindBooth -> diffusers: peft's delta
    weight of every layer equals alpha_l / rank_l * B A."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    rng = np.random.default_rng(1)
    layers, _ = lf.from_mindbooth({**tiny.lora, "lora_alpha": np.float32(ALPHA)})
    for i, (name, layer) in enumerate(layers.items()):
        if i % 3 == 0:  # rank 2, alpha 3
            layers[name] = lf.LoraLayer(layer.down[:2], layer.up[:, :2], 3.0)
        elif i % 3 == 1:  # rank 4, alpha 1
            layers[name] = lf.LoraLayer(layer.down, layer.up * rng.uniform(0.5, 2), 1.0)
    kohya = tiny.folder / "mixed_kohya.safetensors"
    write_safetensors(lf.to_kohya(layers), {}, kohya, overwrite=True)

    expected = lf.merge_deltas(layers)
    for uniform in (False, True):
        ckpt = tiny.folder / f"mixed_{uniform}.ckpt"
        convert("to_ms", kohya, ckpt, overwrite=True, uniform_rank=uniform)
        state, _ = read_state(ckpt)
        ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
        assert ranks == ({4} if uniform else {2, 4})
        back, _ = lf.from_mindbooth(state)
        for name, delta in lf.merge_deltas(back).items():
            np.testing.assert_allclose(delta, expected[name], rtol=1e-5, atol=1e-7)

    # to diffusers twice: from the MindBooth file (one alpha, per-layer ranks: rank_pattern) and straight from
    # the layers (per-layer ranks and alphas: rank_pattern + alpha_pattern)
    from_ckpt = tiny.folder / "mixed_peft_from_ckpt.safetensors"
    convert("ms_to_diffusers", tiny.folder / "mixed_False.ckpt", from_ckpt, overwrite=True)
    direct = tiny.folder / "mixed_peft_direct.safetensors"
    tensors, configs = lf.to_diffusers(layers)
    assert list(configs) == ["unet"] and configs["unet"]["rank_pattern"] and configs["unet"]["alpha_pattern"]
    write_safetensors(tensors, lf.export_metadata("diffusers", layers, adapter_configs=configs), direct, overwrite=True)
    for peft_file in (from_ckpt, direct):
        model = copy.deepcopy(tiny.reference)
        model.load_lora_adapter(str(peft_file), prefix="unet", adapter_name="mb", use_safetensors=True)
        checked = 0
        for path, module in model.named_modules():
            if isinstance(module, PeftLoraLayer):
                ours = expected[f"{lf.MINDBOOTH_PREFIX}{diffusers_name_to_official(path, 2)}.weight"]
                np.testing.assert_allclose(module.get_delta_weight("mb").detach().numpy(), ours, rtol=1e-5, atol=1e-7)
                checked += 1
        assert checked == 136
        # and our reader interprets the patterns as peft does
        state, header = read_state(peft_file)
        back, _ = lf.read_layers(state, header)
        for name, delta in lf.merge_deltas(back).items():
            np.testing.assert_allclose(delta, expected[name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- other inputs and errors

def test_attention_processor_names_import_like_diffusers_converts_them(tiny):
    """Older diffusers files (`…attn1.processor.to_q_lora.down.weight`, no alpha): the same layers as diffusers'
    own convert_unet_state_dict_to_peft gives, with alpha = rank."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    peft_state, _ = lf.to_diffusers(lf.from_mindbooth({**tiny.lora, "lora_alpha": np.float32(ALPHA)})[0])
    old = {}
    for key, value in peft_state.items():
        path, _, part = key.rpartition(".lora_")
        module, _, proj = path.rpartition(".")
        module, proj = (module[:-len(".to_out")], "to_out") if proj == "0" else (module, proj)
        old[f"{module}.processor.{proj}_lora.{'down' if part == 'A.weight' else 'up'}.weight"] = value
    by_diffusers = convert_unet_state_dict_to_peft({k: torch.from_numpy(v) for k, v in old.items()})
    assert set(by_diffusers) == set(peft_state)
    layers, info = lf.read_layers(old)
    assert info["format"] == "diffusers"
    ours = lf.to_mindbooth(layers)
    assert float(ours["lora_alpha"]) == RANK  # no alpha in the file: diffusers' scale 1
    for name, value in tiny.lora.items():
        np.testing.assert_array_equal(ours[name], value)


def test_unsupported_keys_are_refused_with_one_line_errors(tiny, capsys):
    kohya, _ = lf.export_lora({**tiny.lora, "lora_alpha": np.float32(ALPHA)}, "kohya")
    te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 32), np.float32),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.zeros((64, 4), np.float32)}
    with pytest.raises(ConversionError, match="'lora_te1_text_model_encoder_layers_0_mlp_fc1' is not on a "
                                              "text-encoder self-attention projection"):
        lf.read_layers({**kohya, **te})
    layers, info = lf.read_layers({**kohya, **te}, drop_text_encoder=True)  # the UNet part only
    assert len(layers) == 136 and info["dropped_text_encoder"] == 2
    with pytest.raises(ConversionError, match="not on a UNet attention projection"):
        lf.read_layers({**kohya, "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((4, 64), np.float32),
                        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": np.zeros((64, 4), np.float32)})
    with pytest.raises(ConversionError, match="unknown LoRA key 'something.weight'"):
        lf.read_layers({**kohya, "something.weight": np.zeros(3)})
    with pytest.raises(ConversionError, match="mixes LoRA formats"):
        lf.read_layers({**kohya, **tiny.lora})
    up = next(k for k in kohya if k.endswith(".lora_up.weight"))
    with pytest.raises(ConversionError, match="has no up/B weight"):
        lf.read_layers({k: v for k, v in kohya.items() if k != up})
    # text-encoder LoRA off q/k/v/out, in the other formats
    fc1 = {"text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_A.weight": np.zeros((4, 64), np.float32),
           "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_B.weight": np.zeros((256, 4), np.float32)}
    with pytest.raises(ConversionError, match="'text_encoder_2.text_model.encoder.layers.1.mlp.fc1' is not on a text"):
        lf.read_layers(fc1)
    c_fc = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc"
    fc1 = {f"{c_fc}.lora_A.weight": np.zeros((4, 64), np.float32), f"{c_fc}.lora_B.weight": np.zeros((256, 4), np.float32)}
    with pytest.raises(ConversionError, match="resblocks.0.mlp.c_fc.lora_A.weight' is not on a text-encoder"):
        lf.read_layers({**tiny.lora, **fc1})
    with pytest.raises(ConversionError, match="only text-encoder LoRA weights"):
        lf.read_layers(te, drop_text_encoder=True)
    # the command line turns them into one line on stderr
    bad = tiny.folder / "te.safetensors"
    write_safetensors({**kohya, **te}, {}, bad, overwrite=True)
    assert convert_main(["--task", "to_ms", "--src", str(bad), "--dst", str(tiny.folder / "te.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and not (tiny.folder / "te.ckpt").exists()


# ---------------------------------------------------------------- 3. merge

def test_merged_checkpoint_equals_base_plus_lora_at_inference(tiny):
    base_ckpt = tiny.folder / "base.ckpt"
    extra = np.arange(6, dtype=np.float16).reshape(2, 3)  # a non-UNet fp16 entry passes through untouched
    entries = [{"name": n, "data": ms.Tensor(v)} for n, v in tiny.base.items()]
    entries.append({"name": "first_stage_model.extra", "data": ms.Tensor(extra)})
    ms.save_checkpoint(entries, str(base_ckpt))
    merged_ckpt = tiny.folder / "merged.ckpt"
    summary = merge(base_ckpt, tiny.lora_ckpt, merged_ckpt)
    assert summary["merged"] == 136

    merged = ms.load_checkpoint(str(merged_ckpt))
    assert merged["first_stage_model.extra"].dtype == ms.float16
    np.testing.assert_array_equal(merged["first_stage_model.extra"].asnumpy(), extra)
    lora_targets = {n.replace(".lora_A.weight", ".weight") for n in tiny.lora if ".lora_A." in n}
    for name, value in tiny.base.items():
        if name not in lora_targets:
            np.testing.assert_array_equal(merged[name].asnumpy(), value)
    fresh = _Holder(build_unet(TINY_CONFIG))
    load_params(fresh, {k: v for k, v in merged.items() if k != "first_stage_model.extra"}, strict=True)
    out = run_ours(fresh.model.diffusion_model, tiny.inputs)
    assert relative_error(out, tiny.lora_out) < 1e-5
    assert relative_error(out, tiny.base_out) > 1e-2

    # never overwrites by accident, and leaves no partial file behind
    with pytest.raises(ConversionError, match="exists.*--overwrite"):
        merge(base_ckpt, tiny.lora_ckpt, merged_ckpt)
    merge(base_ckpt, tiny.lora_ckpt, merged_ckpt, scale=0.0, overwrite=True)
    np.testing.assert_array_equal(ms.load_checkpoint(str(merged_ckpt))[sorted(lora_targets)[0]].asnumpy(),
                                  tiny.base[sorted(lora_targets)[0]])
    # every LoRA layer needs its base weight
    missing = sorted(lora_targets)[5]
    ms.save_checkpoint([e for e in entries if e["name"] != missing], str(tiny.folder / "partial_base.ckpt"))
    with pytest.raises(ConversionError, match=f"no weight '{missing}'"):
        merge(tiny.folder / "partial_base.ckpt", tiny.lora_ckpt, tiny.folder / "never.ckpt")
    assert not (tiny.folder / "never.ckpt").exists() and not list(tiny.folder.glob(".*.partial-*"))


def test_a_scale_that_is_not_finite_is_refused_before_reading(tmp_path, capsys):
    from tools.lora_conversion.merge_lora import main as merge_main

    for scale in ("nan", "inf"):
        assert merge_main(["--base_ckpt", str(tmp_path / "base.ckpt"), "--lora_ckpt", str(tmp_path / "lora.ckpt"),
                           "--output", str(tmp_path / "out.ckpt"), "--scale", scale]) == 2
        assert capsys.readouterr().err.strip() == f"error: --scale must be a finite number, got {scale}"
    assert not list(tmp_path.iterdir())


def test_convert_lora_checks_the_lora_against_the_model_of_config(tmp_path):
    """With --config, a LoRA layer whose B A does not fit the model's weight (here one input feature too many) is
    refused before anything is written; without it the file is converted as it is."""
    from tools.model_conversion.sdxl_layout import rule_mindspore_shapes

    name, (out, inputs) = next((n, s) for n, s in rule_mindspore_shapes(TINY_CONFIG).items() if n.endswith("attn1.to_q.weight"))
    layer = name[:-len(".weight")]
    src = tmp_path / "lora.ckpt"
    _save_mindbooth({f"{layer}.lora_A.weight": np.zeros((RANK, inputs + 1), np.float32),
                     f"{layer}.lora_B.weight": np.zeros((out, RANK), np.float32)}, src)
    with pytest.raises(ConversionError, match=f"base weight '{name}' has shape"):
        convert("ms_to_kohya", src, tmp_path / "out.safetensors", config=str(TINY_CONFIG))
    assert not (tmp_path / "out.safetensors").exists()
    convert("ms_to_kohya", src, tmp_path / "out.safetensors")


# ---------------------------------------------------------------- 4. full-size names

def _reference_lines(name):
    lines = []
    for line in (LORA_KEYS / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("#")[:2]
            lines.append((key, tuple(int(d) for d in shape.strip("()").split(","))))
    return lines


def _processor_to_peft(key):
    """`….attn1.processor.to_q_lora.down.weight` -> `….attn1.to_q.lora_A.weight` (the PEFT naming)."""
    module, _, rest = key.partition(".processor.")
    proj, _, part = rest.partition("_lora.")
    proj = "to_out.0" if proj == "to_out" else proj
    return f"{module}.{proj}.lora_{'A' if part == 'down.weight' else 'B'}.weight"


def test_full_size_names_match_mindone_and_diffusers_references():
    with no_init_parameters():
        holder = _Holder(build_unet(BASE_CONFIG))
    inject_lora(holder, rank=RANK)
    shapes = {name: tuple(p.shape) for name, p in lora_parameters(holder).items()}
    ms_lines, pt_lines = _reference_lines("ms_lora_params.txt"), _reference_lines("pt_lora_params_ordered.txt")
    assert shapes == dict(ms_lines)
    # tag each tensor with its line number so that the pairing itself is checked, not just the name sets
    state = {name: np.full(shape, i, np.float32) for i, (name, shape) in enumerate(ms_lines)}
    state.update(lora_rank=np.float32(RANK), lora_alpha=np.float32(RANK))

    peft, _ = lf.export_lora(state, "diffusers")
    expected = {_processor_to_peft(key): (i, shape) for i, (key, shape) in enumerate(pt_lines)}
    assert set(peft) == set(expected) and len(peft) == 1120
    for key, (i, shape) in expected.items():
        assert peft[key].shape == shape and peft[key].flat[0] == i

    # kohya names, converted by diffusers' own kohya-SDXL converter, give the reference attention-processor names
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers,
    )
    kohya, _ = lf.export_lora(state, "kohya")
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in kohya
    as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in kohya.items()}
    mapped = _maybe_map_sgm_blocks_to_diffusers(as_torch, SimpleNamespace(layers_per_block=2))
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)
    assert len(alphas) == 560
    for i, (key, shape) in enumerate(pt_lines):
        assert tuple(converted[key].shape) == shape and converted[key].flatten()[0].item() == i

    # and both come back to the MindONE names and values
    for exported in (peft, kohya):
        back = lf.to_mindbooth(lf.read_layers(exported)[0])
        assert set(back) == set(state)
        assert all(back[name].flat[0] == i for i, (name, _) in enumerate(ms_lines))


# ---------------------------------------------------------------- 5. text-encoder LoRA (--train_text_encoder)

TEXT_LAYERS = 2 * 4 + 2 * (3 + 1)  # tiny CLIP-L: 2 layers x q/k/v/out; tiny bigG: 2 x (fused q/k/v + out)


def _encode(conditioner, ids):
    """(CLIP-L hidden state, bigG penultimate hidden state, bigG pooled) for token ids (CLIP-L's, bigG's)."""
    z, pooled = conditioner.embedders[1](ms.Tensor(ids[1]))
    return conditioner.embedders[0](ms.Tensor(ids[0])).asnumpy(), z.asnumpy(), pooled.asnumpy()


def _encode_transformers(hf_l, hf_g, ids, layer_idx):
    with torch.no_grad():
        out_l = hf_l(input_ids=torch.from_numpy(ids[0]).long(), output_hidden_states=True)
        out_g = hf_g(input_ids=torch.from_numpy(ids[1]).long(), output_hidden_states=True)
    return out_l.hidden_states[layer_idx].numpy(), out_g.hidden_states[-2].numpy(), out_g.text_embeds.numpy()


@pytest.fixture(scope="module")
def models():
    return build_models("cpu" if resolve_backend("auto") == "cpu" else "plain")  # as the trainer builds it here


@pytest.fixture(scope="module")
def text(tiny, models):
    """The tiny engine built with `lora_config: {text_encoder: True}`: UNet and UNet LoRA from `tiny`, text encoders
    on the weights of the transformers models of test_text_encoders, random text-encoder LoRA; saved as the trainer
    saves a LoRA (save_lora), with the text encoders' outputs with and without the LoRA."""
    conditioner, hf_l, hf_g, p_l = models
    config = load_config(TINY_CONFIG).model
    config.params.lora_config = {"rank": RANK, "alpha": ALPHA, "text_encoder": True}
    engine = instantiate_from_config(config)
    weights = random_weights(engine, seed=3)  # the VAE; everything else is overwritten below
    weights.update(tiny.base)
    weights.update(tiny.lora)
    weights.update({f"conditioner.{n}": p.asnumpy() for n, p in conditioner.parameters_and_names()})
    rng = np.random.default_rng(4)
    text_lora = {n: (rng.standard_normal(v.shape) * 0.2).astype(np.float32)
                 for n, v in weights.items() if n.startswith("conditioner.") and is_lora_name(n)}
    weights.update(text_lora)
    load_params(engine, weights, strict=True)
    ids = next(token_sets(conditioner))
    lora_ckpt = tiny.folder / "unet_and_text_lora.ckpt"
    save_lora(engine, lora_ckpt, RANK, ALPHA)
    return SimpleNamespace(engine=engine, weights=weights, text_lora=text_lora, ids=ids, lora_ckpt=lora_ckpt,
                           hf_l=hf_l, hf_g=hf_g, layer_idx=p_l["layer_idx"],
                           base_out=_encode(conditioner, ids), lora_out=_encode(engine.conditioner, ids))


def test_text_fixture_lora_changes_the_text_encoders(text):
    assert len(text.text_lora) == 2 * TEXT_LAYERS
    assert len(lora_layers(text.engine.conditioner)) == TEXT_LAYERS
    for with_lora, without in zip(text.lora_out, text.base_out):
        assert relative_error(with_lora, without) > 1e-2


@pytest.mark.parametrize("task", ["ms_to_diffusers", "ms_to_kohya"])
def test_text_encoder_lora_round_trips_bit_identical(text, tiny, task):
    exported = tiny.folder / f"text_{task}.safetensors"
    summary = convert(task, text.lora_ckpt, exported, overwrite=True)
    assert summary["layers"] == 136 + TEXT_LAYERS and summary["text_encoder_layers"] == TEXT_LAYERS
    back = tiny.folder / f"text_{task}_back.ckpt"
    summary = convert("to_ms", exported, back, overwrite=True)
    assert summary["layers"] == 136 + TEXT_LAYERS and summary["text_encoder_layers"] == TEXT_LAYERS
    loaded = ms.load_checkpoint(str(back))
    assert set(loaded) == set(tiny.lora) | set(text.text_lora) | {"lora_rank", "lora_alpha"}
    for name, value in {**tiny.lora, **text.text_lora}.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)

    with safe_open(str(exported), "np") as f:
        meta, keys = f.metadata(), set(f.keys())
    if task == "ms_to_kohya":
        assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha" in keys
        assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight" in keys
        assert meta["ss_network_train_unet_only"] == "False"
    else:
        assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in keys
        assert "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight" in keys
        config = json.loads(meta[lf.LORA_ADAPTER_METADATA_KEY])  # save_lora_weights' layout: one prefix each
        for component in ("unet", "text_encoder", "text_encoder_2"):
            assert config[f"{component}.r"] == RANK and config[f"{component}.lora_alpha"] == ALPHA
        assert "encoder.layers.0.self_attn.q_proj" in config["text_encoder_2.target_modules"]
        # files written with transformers >= 5 name the modules without `text_model.`: the same layers
        state, header = read_state(exported)
        flat = {k.replace(".text_model.", "."): v for k, v in state.items()}
        layers, _ = lf.read_layers(flat, header)
        assert lf.to_mindbooth(layers).keys() == loaded.keys()

    # --drop_text_encoder keeps the UNet part, both ways
    unet_only = tiny.folder / f"text_{task}_unet_only.safetensors"
    summary = convert(task, text.lora_ckpt, unet_only, overwrite=True, drop_text_encoder=True)
    assert summary["layers"] == 136 and summary["dropped_text_encoder"] == 2 * TEXT_LAYERS
    with safe_open(str(unet_only), "np") as f:
        assert len(f.keys()) == 136 * (2 if task == "ms_to_diffusers" else 3)
    summary = convert("to_ms", exported, back, overwrite=True, drop_text_encoder=True)
    assert summary["layers"] == 136
    assert set(ms.load_checkpoint(str(back))) == set(tiny.lora) | {"lora_rank", "lora_alpha"}


def test_diffusers_loads_our_unet_and_text_encoder_lora_like_our_model(text, tiny):
    """The steps of StableDiffusionXLPipeline.load_lora_weights (lora_state_dict, load_lora_into_unet,
    load_lora_into_text_encoder for text_encoder and text_encoder_2) on our exported files, on the transformers text
    encoders and the diffusers UNet that hold our base weights: the outputs of our LoRA model."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXLLoader

    for task in ("ms_to_diffusers", "ms_to_kohya"):
        exported = tiny.folder / f"text_{task}_for_diffusers.safetensors"
        convert(task, text.lora_ckpt, exported, overwrite=True)
        unet, hf_l, hf_g = (copy.deepcopy(m) for m in (tiny.reference, text.hf_l, text.hf_g))
        state, alphas, metadata = SDXLLoader.lora_state_dict(str(exported), unet_config=unet.config,
                                                             return_lora_metadata=True)
        assert (metadata is None) == (task == "ms_to_kohya")  # kohya: per-layer alphas instead
        SDXLLoader.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
        for encoder, prefix in ((hf_l, "text_encoder"), (hf_g, "text_encoder_2")):
            SDXLLoader.load_lora_into_text_encoder(state, alphas, text_encoder=encoder, prefix=prefix,
                                                   metadata=metadata)
        lora_modules = sum(".lora_A." in n for model in (hf_l, hf_g) for n, _ in model.named_parameters())
        assert lora_modules == 2 * 4 * 2  # peft's text LoRA: q/k/v/out_proj of 2 layers in each encoder
        outputs = _encode_transformers(hf_l, hf_g, text.ids, text.layer_idx)
        for theirs, ours in zip(outputs, text.lora_out):
            assert relative_error(theirs, ours) < 1e-4
        _assert_diffusers_matches(tiny, unet)


def test_text_encoder_per_layer_ranks_and_alphas_reach_peft(text, tiny):
    """Text-encoder layers with their own ranks and alphas (as a kohya file may have) -> diffusers: peft's delta
    weight of every text-encoder module equals alpha_l / rank_l * B A (rank/alpha patterns as name suffixes)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXLLoader
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    layers, _ = lf.from_mindbooth({**text.text_lora, "lora_alpha": np.float32(ALPHA)})
    for i, (name, layer) in enumerate(layers.items()):
        if i % 3 == 0:
            layers[name] = lf.LoraLayer(layer.down[:2], layer.up[:, :2], 3.0)
        elif i % 3 == 1:
            layers[name] = lf.LoraLayer(layer.down, layer.up, 1.0)
    tensors, configs = lf.to_diffusers(layers)
    assert set(configs) == {"text_encoder", "text_encoder_2"} and configs["text_encoder_2"]["alpha_pattern"]
    peft_file = tiny.folder / "text_mixed_peft.safetensors"
    write_safetensors(tensors, lf.export_metadata("diffusers", layers, adapter_configs=configs), peft_file,
                      overwrite=True)
    expected = lf.merge_deltas(layers)
    state, alphas, metadata = SDXLLoader.lora_state_dict(str(peft_file), return_lora_metadata=True)
    checked = 0
    for model, prefix in ((copy.deepcopy(text.hf_l), "text_encoder"), (copy.deepcopy(text.hf_g), "text_encoder_2")):
        SDXLLoader.load_lora_into_text_encoder(state, alphas, text_encoder=model, prefix=prefix, metadata=metadata,
                                               adapter_name="mb")
        for path, module in model.named_modules():
            if isinstance(module, PeftLoraLayer):
                layer = te_names.from_diffusers(f"{prefix}.{path}")
                weight, block = te_names.base_weight(layer)
                ours = expected[weight]
                if block is not None:
                    ours = ours[block * ours.shape[1]:(block + 1) * ours.shape[1]]
                np.testing.assert_allclose(module.get_delta_weight("mb").detach().numpy(), ours, rtol=1e-5, atol=1e-7)
                checked += 1
    assert checked == TEXT_LAYERS
    back, _ = lf.read_layers(*read_state(peft_file))  # and our reader interprets the patterns as peft does
    for name, delta in lf.merge_deltas(back).items():
        np.testing.assert_allclose(delta, expected[name], rtol=1e-5, atol=1e-7)


def test_old_diffusers_text_encoder_names_read_like_diffusers_converts_them(text):
    """`…q_proj.lora_linear_layer.down.weight` (diffusers' text-encoder LoRA before PEFT): diffusers'
    convert_state_dict_to_peft gives the PEFT names we write, and we read the same layers from either."""
    from diffusers.utils import convert_state_dict_to_peft

    layers, _ = lf.from_mindbooth({**text.text_lora, "lora_alpha": np.float32(RANK)})
    peft_state, _ = lf.to_diffusers(layers)
    old = {k.replace(".lora_A.weight", ".lora_linear_layer.down.weight")
           .replace(".lora_B.weight", ".lora_linear_layer.up.weight"): v for k, v in peft_state.items()}
    assert set(convert_state_dict_to_peft({k: torch.from_numpy(v) for k, v in old.items()})) == set(peft_state)
    back = lf.to_mindbooth(lf.read_layers(old)[0])
    for name, value in text.text_lora.items():
        np.testing.assert_array_equal(back[name], value)


def test_merged_text_encoder_lora_equals_the_lora_model(text, tiny):
    """merge_lora on a UNet + text-encoder LoRA: a plain engine (no LoRA layers) on the merged checkpoint gives the
    LoRA engine's text-encoder outputs and UNet output; bigG's q/k/v land in their rows of the fused in_proj_weight."""
    base_ckpt = tiny.folder / "engine_base.ckpt"
    base = {n: v for n, v in text.weights.items() if not is_lora_name(n)}
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in base.items()], str(base_ckpt))
    merged_ckpt = tiny.folder / "engine_merged.ckpt"
    summary = merge(base_ckpt, text.lora_ckpt, merged_ckpt)
    assert summary["merged"] == 136 + TEXT_LAYERS and summary["weights"] == 136 + 2 * 4 + 2 * 2

    merged = {n: t.asnumpy() for n, t in ms.load_checkpoint(str(merged_ckpt)).items()}
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    width = base[in_proj].shape[1]
    for block, proj in enumerate("qkv"):
        lora = f"conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_lora.{proj}_proj"
        delta = (ALPHA / RANK) * text.text_lora[f"{lora}.lora_B.weight"] @ text.text_lora[f"{lora}.lora_A.weight"]
        rows = slice(block * width, (block + 1) * width)
        np.testing.assert_allclose(merged[in_proj][rows] - base[in_proj][rows], delta, rtol=1e-4, atol=1e-6)
    targets = set(lf.merge_targets(lf.read_layers(read_state(text.lora_ckpt)[0])[0]))
    assert in_proj in targets
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in targets
    for name, value in base.items():
        if name not in targets:
            np.testing.assert_array_equal(merged[name], value)

    plain = instantiate_from_config(load_config(TINY_CONFIG).model)
    load_params(plain, merged, strict=True)
    for ours, with_lora in zip(_encode(plain.conditioner, text.ids), text.lora_out):
        assert relative_error(ours, with_lora) < 1e-5
    assert relative_error(run_ours(plain.model.diffusion_model, tiny.inputs), tiny.lora_out) < 1e-5

    # --drop_text_encoder: the text encoders stay the base's
    merge(base_ckpt, text.lora_ckpt, merged_ckpt, overwrite=True, drop_text_encoder=True)
    merged = ms.load_checkpoint(str(merged_ckpt))
    np.testing.assert_array_equal(merged[in_proj].asnumpy(), base[in_proj])
    # a base whose bigG is another width: one-line error, nothing written
    wrong = {**base, in_proj: np.zeros((3 * width + 3, width), np.float32)}
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in wrong.items()], str(tiny.folder / "wrong.ckpt"))
    with pytest.raises(ConversionError, match=f"base weight '{in_proj}' has shape"):
        merge(tiny.folder / "wrong.ckpt", text.lora_ckpt, tiny.folder / "never_text.ckpt")
    assert not (tiny.folder / "never_text.ckpt").exists()

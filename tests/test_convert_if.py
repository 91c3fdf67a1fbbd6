"""DeepFloyd IF weight converter (issue 33): released diffusers folders -> MindBooth `.ckpt`.

Tiny IF stage I (UNet + T5, the T5 sharded by transformers' `max_shard_size`, an fp16 variant beside the fp32 files)
and stage II folders are written with diffusers/transformers `save_pretrained`, converted with the command line, and
loaded strictly into MindBooth's IFUNet / T5EncoderModel, whose outputs must equal diffusers' / transformers' on the
same inputs within 1e-4 relative (fp32). The names and shapes the rules give (no model, nothing allocated) are held
equal to the MindSpore models' and to diffusers' / transformers' for IF-I-XL, IF-II-L and T5-XXL, and a full-size
IF-I-XL folder of sparse files (diffusers' and transformers' own names and shapes, no data) passes `--check`.
"""
import copy
import inspect
import json

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
import yaml
from diffusers import UNet2DConditionModel
from mindspore.nn.utils import no_init_parameters

from conftest import ROOT
from gm.modules.diffusionmodules.if_unet import IFUNet
from gm.modules.embedders.t5 import T5EncoderModel
from mindbooth.ckpt_stream import CkptReader
from mindbooth.tiny_model import tiny_t5_tokenizer
from tools.model_conversion.convert_weight import main
from tools.model_conversion.if_layout import T5_XXL, if_config, if_unet_shapes, t5_shapes
from tools.model_conversion.safetensors_stream import TensorInfo, header_bytes, write_order

CONFIGS = ROOT / "configs" / "inference"
UNET, T5 = "model.diffusion_model.", "conditioner.embedders.0.transformer."
# the tiny T5 of the stage I engine config (numbers as the T5 embedder takes them, and as transformers' T5Config)
TINY_T5 = dict(vocab_size=64, width=16, ff_width=32, layers=2, heads=2, head_dim=8)
TINY_T5_HF = dict(vocab_size=64, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
XXL_HF = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")


def unet_params(config) -> dict:
    return if_config(config).unet


def diffusers_fields(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "spatial_transformer_attn_type"}


def randomize(module: torch.nn.Module, seed: int):
    """Every weight random (norms near 1), so no name mix-up hides behind ones, zeros or an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=generator) * 0.5 / max(1, value[0].numel()) ** 0.5)


def model_index(path, pipeline: str):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.30.0"}))


def engine_config(path, unet: dict, t5: dict = None):
    """An IF engine config as the pipeline's YAMLs lay it out: the UNet under network_config, T5 in the conditioner."""
    params = {"network_config": {"target": "gm.modules.diffusionmodules.if_unet.IFUNet", "params": unet},
              "conditioner_config": "__is_unconditional__"}  # stage II: takes stage I's embeddings
    if t5:
        params["conditioner_config"] = {"target": "gm.modules.embedders.modules.GeneralConditioner", "params": {
            "emb_models": [{"target": "gm.modules.embedders.modules.FrozenT5Embedder", "input_key": "txt",
                            "params": {"tokenizer_file": "checkpoints/t5_spiece.model", **t5}}]}}
    path.write_text(yaml.safe_dump({"model": {"target": "gm.models.diffusion.DiffusionEngine", "params": params}}))
    return path


def write_unet_config(path, unet: dict):
    """An IF config whose model is the UNet itself (the layout before the IF engine)."""
    path.write_text(yaml.safe_dump({"model": {"target": "gm.modules.diffusionmodules.if_unet.IFUNet", "params": unet}}))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny released-layout folders: stage I (UNet, sharded T5, tokenizer; fp32 + fp16 variant) and stage II."""
    root = tmp_path_factory.mktemp("if")
    stage1, stage2 = root / "IF-I-tiny", root / "IF-II-tiny"
    params1, params2 = unet_params(CONFIGS / "if_i_tiny.yaml"), unet_params(CONFIGS / "if_ii_tiny.yaml")
    torch.manual_seed(0)
    unet1 = UNet2DConditionModel(**diffusers_fields(params1)).eval()
    randomize(unet1, 1)
    text = transformers.T5EncoderModel(transformers.T5Config(**TINY_T5_HF)).eval()
    randomize(text, 2)
    unet2 = UNet2DConditionModel(**diffusers_fields(params2)).eval()
    randomize(unet2, 3)
    model_index(stage1, "IFPipeline")
    unet1.save_pretrained(stage1 / "unet")
    copy.deepcopy(unet1).half().save_pretrained(stage1 / "unet", variant="fp16")
    text.save_pretrained(stage1 / "text_encoder", max_shard_size="8KB")
    copy.deepcopy(text).half().save_pretrained(stage1 / "text_encoder", max_shard_size="8KB", variant="fp16")
    (stage1 / "tokenizer").mkdir()
    (stage1 / "tokenizer" / "spiece.model").write_bytes(tiny_t5_tokenizer())
    model_index(stage2, "IFSuperResolutionPipeline")
    unet2.save_pretrained(stage2 / "unet")
    config1 = engine_config(root / "if_i_tiny_engine.yaml", params1, TINY_T5)
    return dict(root=root, stage1=stage1, stage2=stage2, unet1=unet1, text=text, unet2=unet2, config1=config1,
                params1=params1, params2=params2)


def convert(*args) -> int:
    return main(["--task", "diffusers_to_ms", "--no_progress", *map(str, args)])


def error_of(capsys, *args) -> str:
    assert convert(*args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def read_ckpt(path) -> dict:
    with CkptReader(path) as reader:
        return {name: (reader.read(name), info.dtype) for name, info in reader.tensors.items()}


def load_strictly(net, state: dict, prefix: str):
    """Load the names under `prefix` into `net`: every parameter filled, every tensor used, shapes equal."""
    mine = {n[len(prefix):]: ms.Parameter(ms.Tensor(v), name=n[len(prefix):]) for n, (v, _) in state.items()
            if n.startswith(prefix)}
    assert sorted(mine) == sorted(p.name for p in net.get_parameters())
    not_loaded, unused = ms.load_param_into_net(net, mine, strict_load=True)
    assert not not_loaded and not unused
    return net


def relative_error(got, expected) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def stage1_ckpt(folders):
    dst = folders["root"] / "out" / "if_i_tiny_ms.ckpt"
    assert convert("--config", folders["config1"], "--weight_diffusers", folders["stage1"], "--weight_ms", dst) == 0
    return dst


# ------------------------------------------------------------------ tiny: converted weights compute as the reference
def test_stage_one_unet_and_t5_equal_diffusers_and_transformers(folders, stage1_ckpt):
    state = read_ckpt(stage1_ckpt)
    assert {code for _, code in state.values()} == {"F32"}
    assert sorted(state) == sorted([*if_unet_shapes(folders["params1"]), *t5_shapes({**T5_XXL, **TINY_T5}, T5)])
    unet = load_strictly(IFUNet(**folders["params1"]), state, UNET).set_train(False)
    t5 = load_strictly(T5EncoderModel(**TINY_T5, max_length=512), state, T5).set_train(False)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY_T5["vocab_size"], (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected_text = folders["text"](torch.tensor(ids, dtype=torch.long),
                                        attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    text = t5(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    assert relative_error(text, expected_text) <= 1e-4

    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    t = np.array([999, 17], np.int64)
    with torch.no_grad():
        expected = folders["unet1"](torch.tensor(x), torch.tensor(t),
                                    encoder_hidden_states=torch.tensor(expected_text)).sample.numpy()
    got = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(expected_text)).asnumpy()
    assert got.shape == (2, 6, 16, 16)
    assert relative_error(got, expected) <= 1e-4


def test_the_tokenizer_is_copied_next_to_the_checkpoint(folders, stage1_ckpt):
    copied = stage1_ckpt.parent / "t5_spiece.model"
    assert copied.read_bytes() == (folders["stage1"] / "tokenizer" / "spiece.model").read_bytes()


@pytest.mark.parametrize("engine", [False, True], ids=["unet_config", "engine_config"])
def test_stage_two(folders, tmp_path, engine):
    """Stage II: UNet only (no text encoder in its model); the config as the UNet itself (model.params) or as an
    engine without a conditioner."""
    dst = tmp_path / "if_ii.ckpt"
    config = (engine_config(tmp_path / "if_ii_engine.yaml", folders["params2"]) if engine
              else write_unet_config(tmp_path / "if_ii_unet.yaml", folders["params2"]))
    assert convert("--config", config, "--weight_diffusers", folders["stage2"], "--weight_ms", dst) == 0
    state = read_ckpt(dst)
    assert all(n.startswith(UNET) for n in state)
    unet = load_strictly(IFUNet(**folders["params2"]), state, UNET).set_train(False)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 16, 16)).astype(np.float32)
    t, noise_level = np.array([500, 3], np.int64), np.array([250, 0], np.int64)
    context = rng.standard_normal((2, 7, 16)).astype(np.float32)
    with torch.no_grad():
        expected = folders["unet2"](torch.tensor(x), torch.tensor(t), encoder_hidden_states=torch.tensor(context),
                                    class_labels=torch.tensor(noise_level)).sample.numpy()
    got = unet(ms.Tensor(x), ms.Tensor(t), ms.Tensor(context), ms.Tensor(noise_level)).asnumpy()
    assert relative_error(got, expected) <= 1e-4
    assert not (tmp_path / "t5_spiece.model").exists()


def test_fp16_variant_sharded_t5_keep_and_fp32(folders, tmp_path):
    """--variant fp16 reads the fp16 files (sharded T5 with its variant index): --dtype keep writes them bit for bit,
    the default fp32 writes them widened exactly."""
    keep, wide = tmp_path / "keep.ckpt", tmp_path / "wide.ckpt"
    assert len(list((folders["stage1"] / "text_encoder").glob("*fp16*.safetensors"))) > 1  # really sharded
    common = ("--config", folders["config1"], "--weight_diffusers", folders["stage1"], "--variant", "fp16")
    assert convert(*common, "--dtype", "keep", "--weight_ms", keep) == 0
    assert convert(*common, "--weight_ms", wide) == 0
    half, full = read_ckpt(keep), read_ckpt(wide)
    reference = {UNET + n: v for n, v in folders["unet1"].state_dict().items()}
    reference.update({T5 + n: v for n, v in folders["text"].state_dict().items() if n != "encoder.embed_tokens.weight"})
    assert sorted(half) == sorted(full) == sorted(reference)
    for name, value in reference.items():
        as_half = value.half().numpy()
        assert half[name][1] == "F16" and np.array_equal(half[name][0], as_half), name
        assert full[name][1] == "F32" and np.array_equal(full[name][0], as_half.astype(np.float32)), name


def test_unet_only_and_text_encoder_only(folders, tmp_path, capsys):
    unet_only, t5_only = tmp_path / "unet.ckpt", tmp_path / "t5" / "t5.ckpt"
    # the UNet-only stage I config (model: the IFUNet, which pairs with T5-XXL) with --no_text_encoder
    assert convert("--config", write_unet_config(tmp_path / "unet.yaml", folders["params1"]), "--weight_diffusers",
                   folders["stage1"], "--weight_ms", unet_only, "--no_text_encoder") == 0
    assert convert("--config", folders["config1"], "--weight_diffusers", folders["stage1"],
                   "--weight_ms", t5_only, "--text_encoder_only") == 0
    assert sorted(read_ckpt(unet_only)) == sorted(if_unet_shapes(folders["params1"]))
    assert sorted(read_ckpt(t5_only)) == sorted(t5_shapes({**T5_XXL, **TINY_T5}, T5))
    assert (t5_only.parent / "t5_spiece.model").is_file() and not (tmp_path / "t5_spiece.model").exists()


def test_check_writes_nothing(folders, tmp_path, capsys):
    dst = tmp_path / "x.ckpt"
    assert convert("--config", folders["config1"], "--weight_diffusers", folders["stage1"], "--weight_ms", dst,
                   "--check") == 0
    assert "ok:" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad input: one line, nothing written
def test_a_stage_two_folder_with_a_stage_one_config(folders, tmp_path, capsys):
    err = error_of(capsys, "--config", folders["config1"], "--weight_diffusers", folders["stage2"],
                   "--weight_ms", tmp_path / "x.ckpt")
    assert "stage II (IFSuperResolutionPipeline)" in err and "--config configs/inference/if_ii_l.yaml" in err
    err = error_of(capsys, "--config", engine_config(tmp_path.parent / "ii.yaml", folders["params2"]),
                   "--weight_diffusers", folders["stage1"],
                   "--weight_ms", tmp_path / "x.ckpt")
    assert "--config configs/inference/if_i_xl.yaml" in err
    assert list(tmp_path.iterdir()) == []


def test_wrong_sizes_and_wrong_families(folders, tmp_path, capsys):
    dst = tmp_path / "x.ckpt"
    err = error_of(capsys, "--config", CONFIGS / "if_i_xl.yaml", "--weight_diffusers", folders["stage1"],
                   "--weight_ms", dst, "--no_text_encoder")
    assert "does not match the model of" in err and "unet/config.json differs in block_out_channels" in err
    err = error_of(capsys, "--weight_diffusers", folders["stage1"], "--weight_ms", dst)  # default config: SDXL
    assert "is DeepFloyd IF: pass --config configs/inference/if_i_xl.yaml" in err
    sd = tmp_path / "sd"
    model_index(sd, "StableDiffusionPipeline")
    err = error_of(capsys, "--config", folders["config1"], "--weight_diffusers", sd, "--weight_ms", dst)
    assert "a StableDiffusionPipeline folder, not DeepFloyd IF" in err
    err = error_of(capsys, "--config", CONFIGS / "sd_v1.5.yaml", "--weight_diffusers", sd, "--weight_ms", dst)
    assert "not a diffusers pipeline folder (its model_index.json says StableDiffusionPipeline): no unet/" in err
    err = error_of(capsys, "--config", CONFIGS / "sd_v1.5.yaml", "--weight_diffusers", sd, "--weight_ms", dst,
                   "--no_text_encoder")
    assert "for DeepFloyd IF configs only" in err
    assert main(["--task", "pt_to_ms", "--config", str(folders["config1"]), "--weight_safetensors",
                 str(folders["stage1"] / "unet" / "diffusion_pytorch_model.safetensors"), "--weight_ms", str(dst)]) == 1
    assert "use --task diffusers_to_ms" in capsys.readouterr().err
    err = error_of(capsys, "--config", folders["config1"], "--weight_diffusers", folders["stage1"], "--weight_ms", dst,
                   "--variant", "bf16")
    assert "pass --variant" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_a_different_tokenizer_next_to_the_output_is_not_replaced(folders, tmp_path, capsys):
    (tmp_path / "t5_spiece.model").write_bytes(b"another")
    err = error_of(capsys, "--config", folders["config1"], "--weight_diffusers", folders["stage1"],
                   "--weight_ms", tmp_path / "x.ckpt")
    assert "is another tokenizer (pass --overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5_spiece.model"]


# ------------------------------------------------------------------ full size: rules = models = diffusers/transformers
@pytest.mark.parametrize("name", ["if_i_tiny", "if_ii_tiny", "if_i_xl", "if_ii_l"])
def test_rules_are_the_names_the_shipped_configs_build(name):
    """The checkpoint names of a shipped IF config are those of the model it builds (the IF engine: UNet under
    model.diffusion_model., stage I's T5 under conditioner.embedders.0.transformer.; or the UNet alone)."""
    from gm.util import instantiate_from_config
    from tools.model_conversion.if_layout import checkpoint_shapes
    from tools.model_conversion.sdxl_layout import load_config

    config = if_config(CONFIGS / f"{name}.yaml")
    with no_init_parameters():
        model = instantiate_from_config(load_config(CONFIGS / f"{name}.yaml")["model"])
    built = {p.name: tuple(p.shape) for p in model.get_parameters()}
    if isinstance(model, IFUNet):  # the config is the UNet itself
        built = {UNET + n: s for n, s in built.items()}
        assert built == checkpoint_shapes(config, text_encoder=False)
    else:
        assert built == checkpoint_shapes(config)
        assert (config.t5_prefix is not None) == (config.stage == 1)


@pytest.mark.parametrize("name", ["if_i_xl", "if_ii_l"])
def test_full_size_unet_rules_equal_ifunet_and_diffusers(name):
    params = unet_params(CONFIGS / f"{name}.yaml")
    rule = if_unet_shapes(params, prefix="")
    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_fields(params))
    with no_init_parameters():  # names and shapes only
        model = IFUNet(**params)
    assert rule == {p.name: tuple(p.shape) for p in model.get_parameters()}
    assert rule == {n: tuple(v.shape) for n, v in reference.state_dict().items()}


def test_full_size_t5_rules_equal_the_model_transformers_and_the_embedder_defaults():
    from gm.modules.embedders.modules import FrozenT5Embedder

    defaults = {k: v.default for k, v in inspect.signature(FrozenT5Embedder).parameters.items() if k in T5_XXL}
    assert defaults == T5_XXL
    rule = t5_shapes(T5_XXL)
    with no_init_parameters():
        model = T5EncoderModel(**T5_XXL)
    assert rule == {p.name: tuple(p.shape) for p in model.get_parameters()}
    with torch.device("meta"):
        reference = transformers.T5EncoderModel(transformers.T5Config(**XXL_HF))
    assert rule == {n: tuple(v.shape) for n, v in reference.state_dict().items() if n != "encoder.embed_tokens.weight"}


def sparse(path, shapes: dict):
    """A safetensors file with these names and shapes (fp16) and a hole for the data."""
    infos = write_order([TensorInfo(n, "F16", tuple(s)) for n, s in shapes.items()])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header_bytes(infos))
        f.truncate(f.tell() + sum(i.nbytes for i in infos))


def test_a_full_size_if_i_xl_folder_passes_check(tmp_path, capsys):
    """IF-I-XL-v1.0's layout: fp16 UNet file, T5-XXL in two fp16 shards with its variant index, both with the names
    diffusers and transformers save (the tied embed_tokens table included, as some exports have it)."""
    params = unet_params(CONFIGS / "if_i_xl.yaml")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_fields(params))
        text = transformers.T5EncoderModel(transformers.T5Config(**XXL_HF))
    folder = tmp_path / "IF-I-XL-v1.0"
    model_index(folder, "IFPipeline")
    sparse(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors",
           {n: v.shape for n, v in unet.state_dict().items()})
    names = list(text.state_dict())
    shards = {"model.fp16-00001-of-00002.safetensors": names[:100], "model.fp16-00002-of-00002.safetensors": names[100:]}
    for file, part in shards.items():
        sparse(folder / "text_encoder" / file, {n: text.state_dict()[n].shape for n in part})
    (folder / "text_encoder" / "model.safetensors.index.fp16.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    dst = tmp_path / "if_i_xl_ms.ckpt"
    assert convert("--config", CONFIGS / "if_i_xl.yaml", "--weight_diffusers", folder, "--variant", "fp16",
                   "--weight_ms", dst, "--check") == 0
    out = capsys.readouterr().out
    count = len(unet.state_dict()) + len(names) - 1  # the tied embed_tokens table is not written
    numel = sum(v.numel() for v in unet.state_dict().values()) + sum(
        v.numel() for n, v in text.state_dict().items() if n != "encoder.embed_tokens.weight")
    assert numel == pytest.approx(4.30e9 + 4.76e9, rel=0.01)
    assert f"{count} tensors" in out and f"would write {numel * 4 / 2**30:.2f} GiB (fp32)" in out, out
    assert not dst.exists()


@pytest.mark.parametrize("name, stage", [("if_i_tiny", "stage1"), ("if_ii_tiny", "stage2")])
def test_the_shipped_tiny_engine_loads_the_converted_folder_strictly(folders, tmp_path, name, stage):
    """The shipped tiny IF config, built as MindBooth builds it, takes the converted checkpoint strictly (every
    parameter filled, no tensor left over)."""
    from gm.util import instantiate_from_config, load_params
    from tools.model_conversion.sdxl_layout import load_config

    model_config = load_config(CONFIGS / f"{name}.yaml")["model"]
    if "network_config" not in model_config.get("params", {}):
        pytest.skip(f"{name}.yaml is the UNet alone here, not the IF engine")
    dst = tmp_path / f"{name}.ckpt"
    assert convert("--config", CONFIGS / f"{name}.yaml", "--weight_diffusers", folders[stage], "--weight_ms", dst) == 0
    engine = instantiate_from_config(model_config)
    missing, unexpected = load_params(engine, ms.load_checkpoint(str(dst)), strict=True)
    assert not missing and not unexpected

"""A released DeepFloyd IF diffusers folder (IF-I-XL-v1.0, IF-II-L-v1.0, ...) -> a MindBooth IF `.ckpt`.

Read: `unet/diffusion_pytorch_model[.<variant>].safetensors` (or shards with an index), and for stage I
`text_encoder/model[.<variant>]-0000N-of-0000M.safetensors` + index (T5 v1.1 XXL) and `tokenizer/spiece.model`.
Written: the UNet under `model.diffusion_model.`, T5 under `conditioner.embedders.<i>.transformer.` (if_layout), one
tensor at a time through `conversion._stream_to_ckpt` (atomic output; a tensor whose type does not change is copied
by the kernel), and the SentencePiece model as `t5_spiece.model` next to the checkpoint (the IF configs'
`tokenizer_file` default is `checkpoints/t5_spiece.model`).

The folder's stage comes from model_index.json (IFPipeline: stage I; IF*SuperResolutionPipeline: stage II) and
must be the config's. Stage II's engine has no text encoder (it takes stage I's T5 embeddings): a T5 in a stage II
folder is not written. transformers ties T5's `encoder.embed_tokens.weight` to `shared.weight` and saves only the
latter; a file holding both keeps `shared.weight` (MindBooth's T5 has only that one table).
"""
import filecmp
import json
import os
import tempfile
from pathlib import Path

from mindbooth.tensor_dtypes import ConversionError
from tools.model_conversion.conversion import FIRST, _check_float, _first, _stream_to_ckpt, check_output
from tools.model_conversion.diffusers_folder import _weight_files, pipeline_class
from tools.model_conversion.if_layout import STAGE_CONFIGS, checkpoint_shapes, if_config

TOKENIZER_NAME = "t5_spiece.model"  # next to the checkpoint: configs' default tokenizer_file checkpoints/t5_spiece.model
TIED_EMBEDDING = "encoder.embed_tokens.weight"


def folder_stage(folder) -> int:
    """1 or 2 for a DeepFloyd IF pipeline folder, 0 for any other (by model_index.json's pipeline class)."""
    kind = pipeline_class(folder)
    if not kind.startswith("IF") or not kind.endswith("Pipeline"):
        return 0
    return 2 if "SuperResolution" in kind else 1


def check_stage(folder, config_path, config) -> int:
    """The folder's stage, after refusing with one line a folder that is not IF or not of the config's stage."""
    stage = folder_stage(folder)
    if not stage:
        kind = pipeline_class(folder)
        what = f"a {kind} folder" if kind != "?" else "not a diffusers pipeline folder (no readable model_index.json)"
        raise ConversionError(f"{folder} is {what}, not DeepFloyd IF (IFPipeline / IFSuperResolutionPipeline): "
                              f"{config_path} is an IF config")
    if stage != config.stage:
        raise ConversionError(f"{folder} is DeepFloyd IF stage {'I' if stage == 1 else 'II'} "
                              f"({pipeline_class(folder)}), {config_path} a stage {'I' if config.stage == 1 else 'II'}"
                              f" model: pass --config {STAGE_CONFIGS[stage]}")
    return stage


class _Tensors:
    """{name: (reader, TensorInfo)} over one component's safetensors file(s)."""

    def __init__(self, readers: list):
        self.readers, self.tensors = readers, {}
        for reader in readers:
            for name, info in reader.tensors.items():
                if name in self.tensors:
                    raise ConversionError(f"'{name}' is in both {self.tensors[name][0].path} and {reader.path}")
                self.tensors[name] = (reader, info)


def _open(component: Path, stem: str, variant, opened: list) -> _Tensors:
    from tools.model_conversion.safetensors_stream import SafetensorsReader

    readers = []
    for path in _weight_files(component, stem, variant):
        reader = SafetensorsReader(path)
        opened.append(reader)
        readers.append(reader)
    return _Tensors(readers)


def _t5_names(tensors: dict) -> dict:
    """{file name: T5EncoderModel name}: the tied token table kept once, as `shared.weight`."""
    names = {n: n for n in tensors}
    if TIED_EMBEDDING in names:
        del names[TIED_EMBEDDING]
        if "shared.weight" not in tensors:
            names[TIED_EMBEDDING] = "shared.weight"
    return names


# the unet/config.json fields that set the layout, most telling first (for a mismatch's message)
LAYOUT_FIELDS = ("block_out_channels", "layers_per_block", "in_channels", "out_channels", "cross_attention_dim",
                 "encoder_hid_dim", "attention_head_dim", "class_embed_type", "time_embedding_dim",
                 "only_cross_attention", "down_block_types", "up_block_types")


def _config_hint(folder: Path, unet_params: dict) -> str:
    """Where unet/config.json and the YAML's UNet params differ (first 3 layout fields), for a mismatch's message."""
    try:
        released = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    differ = [f"{k} {released[k]} (config {unet_params.get(k)})" for k in LAYOUT_FIELDS
              if k in released and released[k] != unet_params.get(k, released[k])]
    return f"; its unet/config.json differs in {', '.join(differ[:3])}" if differ else ""


def _check_names(found: dict, expected: dict, folder: Path, config_path, unet_params: dict):
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    if not (missing or unexpected or wrong):
        return
    if missing or unexpected:
        problem = (f"{len(missing)} keys missing (first: {_first(missing) or '-'}), "
                   f"{len(unexpected)} unexpected (first: {_first(unexpected) or '-'})")
    else:
        problem = f"{len(wrong)} tensors have the wrong shape (first: " + ", ".join(
            f"{n} is {tuple(found[n])}, expected {tuple(expected[n])}" for n in wrong[:FIRST]) + ")"
    raise ConversionError(f"{folder} does not match the model of {config_path}: {problem}"
                          f"{_config_hint(folder, unet_params)}")


def _check_tokenizer_target(spiece: Path, target: Path, overwrite: bool):
    if target.exists() and not overwrite and not filecmp.cmp(spiece, target, shallow=False):
        raise ConversionError(f"{target} exists and is another tokenizer (pass --overwrite to replace it)")


def _copy_atomic(src: Path, dst: Path):
    """`src` -> `dst` through a temporary file in dst's folder, so `dst` is never half-written."""
    handle, partial = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.partial-{os.getpid()}.")
    try:
        with open(handle, "wb") as out, open(src, "rb") as f:
            out.write(f.read())  # a SentencePiece model is under 1 MB
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, dst)
    finally:
        Path(partial).unlink(missing_ok=True)


def if_diffusers_to_mindspore(folder, dst, config_path, dtype="fp32", overwrite=False, progress=True, variant=None,
                              check_only=False, unet=True, text_encoder=True) -> dict:
    """IF diffusers folder -> MindBooth `.ckpt` (UNet and, for stage I, T5; `unet`/`text_encoder` pick the parts).
    Summary as `conversion`'s, with `note` (what was left out, where the tokenizer went)."""
    folder, dst = Path(folder), Path(dst)
    config = if_config(config_path)
    if config is None:
        raise ConversionError(f"{config_path} is not a DeepFloyd IF config")
    check_output(dst, overwrite or check_only, probe=not check_only)
    check_stage(folder, config_path, config)
    notes = []
    with_t5 = text_encoder and config.t5_prefix is not None
    if text_encoder and config.t5_prefix is None and (folder / "text_encoder").is_dir():
        notes.append(f"text_encoder/ not written: the model of {config_path} has no text encoder "
                     "(stage II takes stage I's T5 embeddings)")
    if with_t5 and not (folder / "text_encoder").is_dir():
        if not unet:
            raise ConversionError(f"{folder} has no text_encoder/ (T5) to convert")
        notes.append("no text_encoder/ in the folder: the checkpoint holds the UNet only")
        with_t5 = False
    if not unet and not with_t5:
        raise ConversionError(f"the model of {config_path} has no text encoder: --text_encoder_only writes nothing")
    if unet and not (folder / "unet").is_dir():
        raise ConversionError(f"{folder} has no unet/ folder")
    spiece = folder / "tokenizer" / "spiece.model"
    tokenizer_target = dst.parent / TOKENIZER_NAME
    copy_tokenizer = with_t5 and spiece.is_file()
    if with_t5 and not copy_tokenizer:
        notes.append("no tokenizer/spiece.model in the folder: give the T5 embedder's tokenizer_file yourself")
    if copy_tokenizer:
        _check_tokenizer_target(spiece, tokenizer_target, overwrite)

    opened = []
    try:
        sources = {}  # checkpoint name -> (reader, TensorInfo)
        if unet:
            part = _open(folder / "unet", "diffusion_pytorch_model", variant, opened)
            sources.update({"model.diffusion_model." + n: v for n, v in part.tensors.items()})
        if with_t5:
            part = _open(folder / "text_encoder", "model", variant, opened)
            for name, model_name in _t5_names(part.tensors).items():
                sources[config.t5_prefix + model_name] = part.tensors[name]
        expected = checkpoint_shapes(config, unet=unet, text_encoder=with_t5)
        _check_names({n: info.shape for n, (_, info) in sources.items()}, expected, folder, config_path, config.unet)
        entries = []
        for name in expected:  # the model's order
            reader, info = sources[name]
            _check_float(info.name, info.dtype, reader.path)
            entries.append((name, info.dtype, info.shape, lambda r=reader, i=info: (r.read(i.name), i.dtype),
                            (reader.fileno(), info.offset)))
        summary = _stream_to_ckpt(entries, dst, dtype, overwrite, progress, "diffusers_to_ms", [], check_only)
    finally:
        for reader in opened:
            reader.close()
    if copy_tokenizer:
        if summary["written"]:
            _copy_atomic(spiece, tokenizer_target)
            notes.append(f"T5 tokenizer: {tokenizer_target} (the configs' tokenizer_file; point it there if the "
                         "checkpoint is elsewhere)")
        else:
            notes.append(f"would copy tokenizer/spiece.model to {tokenizer_target}")
    return dict(summary, note="; ".join(notes))

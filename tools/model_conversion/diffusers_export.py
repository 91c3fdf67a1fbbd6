"""MindSpore `.ckpt` -> diffusers pipeline folder (SD 1.x, SD 2.x, SDXL, SSD-1B), laid out as diffusers'
`save_pretrained` lays it out: `unet/`, `vae/` (config.json + diffusion_pytorch_model.safetensors), `text_encoder/`
(+ `text_encoder_2/`; config.json + model.safetensors), `tokenizer/` (+ `tokenizer_2/`), `scheduler/`
(scheduler_config.json) and `model_index.json`. `StableDiffusionPipeline` / `StableDiffusionXLPipeline`
`.from_pretrained(folder)` read it with no network.

Weights: MindSpore names -> the model's sgm names (`keymap`) -> each component's diffusers names through the inverse
maps of the import direction (`diffusers_unet`, `diffusers_vae`, `diffusers_text`). Tensors are read one at a
time when written: renamed and reshaped ones are copied by the kernel where the element type does not change; the
OpenCLIP towers' fused q/k/v and transposed projection are computed from one source tensor each. Configs come from
the inference YAML (`diffusers_configs`), the tokenizers from MindBooth's BPE file (`clip_tokenizer_files`).

The folder is written under a name of its own beside the output and renamed to it at the very end, so an
interrupted export leaves no folder that looks complete; an existing non-empty output folder is never touched.
"""
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mindbooth.ckpt_stream import CkptReader
from mindbooth.tensor_dtypes import ConversionError, cast
from tools.model_conversion import diffusers_configs as configs
from tools.model_conversion.clip_tokenizer_files import pad_token, tokenizer_files
from tools.model_conversion.conversion import (_check_float, _check_now_or_before_publishing, _progress, _sniff,
                                               _target_dtype, _umask, check_keys, check_layout)
from tools.model_conversion.diffusers_folder import LazyTensor, materialize
from tools.model_conversion.diffusers_text import clip_l_from_official, open_clip_from_official
from tools.model_conversion.diffusers_unet import unet_from_official
from tools.model_conversion.diffusers_vae import vae_from_official
from tools.model_conversion.file_layout import FAMILIES
from tools.model_conversion.keymap import mindspore_to_official_name
from tools.model_conversion.safetensors_stream import TensorInfo, write_safetensors

UNET, VAE, EMBEDDER = "model.diffusion_model.", "first_stage_model.", "conditioner.embedders.{}."
METADATA = {"format": "pt"}  # what diffusers and transformers write into their safetensors files
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
TEXT_FOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


# ---------------------------------------------------------------- output folder
def check_output_folder(path, probe: bool = True):
    """Refuse, before any work, an output that is a file or a non-empty folder (never overwritten), or one whose
    parent cannot be written."""
    from mindbooth.validation import UsageError, check_writable_folder

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConversionError(f"output {path} is a file: --weight_diffusers takes a folder to create")
    if path.is_dir() and any(path.iterdir()):
        raise ConversionError(f"output folder {path} exists and is not empty: choose a new or empty folder")
    if probe:
        try:
            check_writable_folder(path.absolute().parent, "output folder")
        except UsageError as error:
            raise ConversionError(str(error)) from None


def _fsync_tree(root: Path):
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_folder(path, verify=None):
    """Yield an empty folder that becomes `path` only if the block finishes (and `verify()`, if given, returns),
    written to disk first. It takes the name only while `path` is absent or an empty folder: a folder filled
    meanwhile by another process is kept, and this export fails."""
    path = Path(path)
    check_output_folder(path, probe=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-{os.getpid()}."))
    try:
        yield partial
        if verify is not None:
            verify()
        _fsync_tree(partial)
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp's 0700 -> a normal folder
        try:
            os.rename(partial, path)  # replaces an empty folder only (ENOTEMPTY / EEXIST otherwise)
        except OSError as error:
            raise ConversionError(f"output folder {path} was filled by another process meanwhile "
                                  f"({error.strerror}); it was left as it is") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------- weights
def _placeholder(shape):
    """A zero-cost array of `shape` (every element the same memory): the maps' names and shapes, no data."""
    return np.broadcast_to(np.zeros((), np.float32), tuple(shape))


class Component:
    """One component's tensors: {diffusers name: (shape, source code, load() -> (data, code), lazy or None)}.
    `lazy` is the LazyTensor a tensor is, unchanged but for its name and shape (a kernel copy candidate)."""

    def __init__(self):
        self.tensors = {}

    def add_lazy(self, mapped: dict):
        for name, value in mapped.items():
            self.tensors[name] = (tuple(value.shape), value.code, value.load, value)

    def add_computed(self, source: str, lazy: LazyTensor, mapping):
        """Tensors `mapping({source: value})` computes from one source tensor (q/k/v split, transpose)."""
        for name, value in mapping({source: _placeholder(lazy.shape)}).items():
            load = lambda n=name: materialize(mapping({source: lazy})[n])  # noqa: E731
            self.tensors[name] = (tuple(value.shape), lazy.code, load, None)

    def infos(self, dtype: str) -> list:
        return [TensorInfo(name, _target_dtype(dtype, code), shape)
                for name, (shape, code, _, _) in self.tensors.items()]


def _open_clip_map(prefix):
    return lambda state: open_clip_from_official(state, prefix=prefix)


def components(reader: CkptReader, texts: list) -> dict:
    """{component folder: Component} of a checkpoint, by the model's sgm names; `texts`: [(embedder index, kind)]."""
    lazy = {mindspore_to_official_name(name): LazyTensor(reader, name) for name in reader.tensors}
    out = {"unet": Component(), "vae": Component()}
    out["unet"].add_lazy(unet_from_official({n: v for n, v in lazy.items() if n.startswith(UNET)}))
    out["vae"].add_lazy(vae_from_official(lazy))
    taken = {n for n in lazy if n.startswith((UNET, VAE))}
    for (folder, _), (index, kind) in zip(TEXT_FOLDERS, texts):
        out[folder] = part = Component()
        if kind == "FrozenCLIPEmbedder":
            prefix = EMBEDDER.format(index) + "transformer."
            part.add_lazy(clip_l_from_official({n: v for n, v in lazy.items() if n.startswith(prefix)}))
        else:
            prefix = EMBEDDER.format(index) + "model."
            for name, value in lazy.items():
                if name.startswith(prefix):
                    part.add_computed(name, value, _open_clip_map(prefix))
        taken |= {n for n in lazy if n.startswith(prefix)}
    left = sorted(set(lazy) - taken)
    if left:
        raise ConversionError(f"{reader.path}: {len(left)} tensors belong to no diffusers component "
                              f"(first: {', '.join(left[:5])})")
    return out


def _write_weights(path: Path, part: Component, dtype: str, progress):
    infos = part.infos(dtype)
    targets = {i.name: i.dtype for i in infos}

    def fetch(name):
        data, code = part.tensors[name][2]()
        return cast(data, code, targets[name])

    def where(name):  # a renamed/reshaped tensor in one piece, element type unchanged: copied by the kernel
        lazy = part.tensors[name][3]
        if lazy is None or lazy.code != targets[name]:
            return None
        pieces = lazy.reader.tensors[lazy.name].pieces
        return (lazy.reader.fileno(), pieces[0][0]) if len(pieces) == 1 else None

    with open(path, "wb") as f:
        write_safetensors(f, infos, fetch, metadata=METADATA, progress=progress, where=where)


def _write_json(path: Path, value: dict):
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- the export
def folder_configs(model_params, family) -> dict:
    """({relative path: JSON dict} of every config file, the text embedders): derived, so checked, before any work."""
    texts = configs.text_encoders(model_params)
    files = {"unet/config.json": configs.unet_config(model_params, family),
             "vae/config.json": configs.vae_config(model_params, family),
             "scheduler/scheduler_config.json": configs.scheduler_config(model_params),
             "model_index.json": configs.model_index(family, [configs.text_encoder_class(k, p) for _, k, p in texts])}
    for (folder, _), (_, kind, p) in zip(TEXT_FOLDERS, texts):
        files[f"{folder}/config.json"] = configs.text_encoder_config(kind, p)
    return files, texts


def mindspore_to_diffusers(src, dst, expected, model_params, family, dtype="fp32", progress=True, check_only=False):
    """MindSpore `.ckpt` of the model `model_params` (a config's `model.params`, of `family`) -> diffusers folder
    `dst`. `expected`: the model's {MindSpore name: shape}, or a function returning it (conversion's docstring)."""
    if family not in FAMILIES:
        raise ConversionError("ms_to_diffusers needs the config of a supported model (" + ", ".join(FAMILIES) + ")")
    check_output_folder(dst, probe=not check_only)
    if _sniff(src) == "safetensors":
        raise ConversionError(f"not a MindSpore checkpoint: {src} (it is a safetensors file)")
    files, texts = folder_configs(model_params, family)
    with CkptReader(src) as reader:
        found = reader.shapes()
        verify = _check_now_or_before_publishing(
            expected, check_only, lambda: check_layout(found, str(src), "MindSpore", family),
            lambda model: check_keys(found, {n: tuple(s) for n, s in model.items()}, str(src), "MindSpore"))
        for t in reader.tensors.values():
            _check_float(t.name, t.dtype, src)
        parts = components(reader, [(index, kind) for index, kind, _ in texts])
        infos = [info for part in parts.values() for info in part.infos(dtype)]
        total = sum(i.nbytes for i in infos)
        if check_only:
            return {"tensors": len(infos), "bytes": total, "seconds": 0.0, "written": False, "note": ""}
        start = time.time()
        with atomic_folder(dst, verify) as folder, _progress(total, "ms_to_diffusers", progress) as bar:
            for name, part in parts.items():
                (folder / name).mkdir()
                _write_weights(folder / name / WEIGHTS[name], part, dtype, bar)
            for (_, tokenizer), (_, kind, p) in zip(TEXT_FOLDERS, texts):
                (folder / tokenizer).mkdir()
                for file_name, text in tokenizer_files(pad_token(kind), p.get("max_length", 77)).items():
                    (folder / tokenizer / file_name).write_text(text, encoding="utf-8")
            (folder / "scheduler").mkdir()
            for relative, value in files.items():
                _write_json(folder / relative, value)
    return {"tensors": len(infos), "bytes": total, "seconds": time.time() - start, "written": True, "note": ""}

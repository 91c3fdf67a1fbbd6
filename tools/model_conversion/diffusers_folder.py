"""A diffusers pipeline folder (`unet/`, `text_encoder/`, `vae/`, and `text_encoder_2/` for SDXL and SSD-1B) seen
as one state dict in the names of the family's official single file, whose tensors are read only when used.

`text_encoder/` is CLIP ViT-L (SD 1.x, SDXL, SSD-1B) or, without a `text_encoder_2/`, OpenCLIP ViT-H (SD 2.x); its
config.json tells them apart by the activation: OpenAI's CLIP uses quick_gelu, OpenCLIP's towers gelu.

The per-component name maps (`diffusers_unet`, `diffusers_text`, `diffusers_vae`) work on
{name: array} dicts. They get `LazyTensor`s here: renames and reshapes stay lazy, and only what a
map computes with (bigG's fused q/k/v, the transposed text projection) is read early. So the
whole pipeline converts with about one tensor in memory at a time.
"""
import json
from pathlib import Path

import numpy as np

from mindbooth.tensor_dtypes import FLOATS, ConversionError, cast, storage_dtype
from tools.model_conversion.file_layout import file_names
from tools.model_conversion.safetensors_stream import SafetensorsReader

# component folder -> stem of its weights file
COMPONENTS = {
    "unet": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "vae": "diffusion_pytorch_model",
}
OPTIONAL = ("text_encoder_2",)


def _hidden_act(component: Path) -> str:
    try:
        return json.loads((component / "config.json").read_text()).get("hidden_act", "?")
    except (OSError, ValueError):
        raise ConversionError(f"no readable config.json in {component}") from None


def _component_maps(folder: Path) -> dict:
    """{component folder: its diffusers -> official (sgm names) map} for the components the folder has."""
    from tools.model_conversion.diffusers_text import clip_l_to_official, open_clip_to_official
    from tools.model_conversion.diffusers_unet import unet_to_official
    from tools.model_conversion.diffusers_vae import vae_to_official

    maps = {"unet": unet_to_official, "text_encoder": clip_l_to_official, "vae": vae_to_official}
    if (folder / "text_encoder_2").is_dir():
        maps["text_encoder_2"] = open_clip_to_official
    elif _hidden_act(folder / "text_encoder") == "gelu":  # SD 2.x: OpenCLIP ViT-H is embedder 0
        maps["text_encoder"] = lambda state: open_clip_to_official(state, prefix="conditioner.embedders.0.model.")
    return maps


class LazyTensor:
    """One tensor of a safetensors file, read on `np.asarray`; bf16 is read as float32 (exact)."""

    def __init__(self, reader, name, shape=None):
        info = reader.tensors[name]
        self.reader, self.name, self.code = reader, name, info.dtype
        self.shape = tuple(info.shape if shape is None else shape)

    @property
    def dtype(self):
        return np.dtype(np.float32 if self.code == "BF16" else storage_dtype(self.code))

    @property
    def ndim(self):
        return len(self.shape)

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if int(np.prod(shape)) != int(np.prod(self.shape)):
            raise ValueError(f"cannot reshape {self.name} {self.shape} to {shape}")
        return LazyTensor(self.reader, self.name, shape)

    def load(self):
        """(data, safetensors code) in the stored type."""
        return self.reader.read(self.name).reshape(self.shape), self.code

    def __array__(self, dtype=None, copy=None):
        data, code = self.load()
        data = cast(data, code, "F32") if code == "BF16" else data
        return data if dtype is None else data.astype(dtype)


def materialize(value):
    """(data, safetensors code) of a LazyTensor or of an array a name map computed."""
    if isinstance(value, LazyTensor):
        return value.load()
    data = np.asarray(value)
    codes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}
    if data.dtype not in codes:
        raise ConversionError(f"unsupported element type {data.dtype} from a diffusers name map")
    return data, codes[data.dtype]


def _weight_files(folder: Path, stem: str, variant):
    """The safetensors file(s) of one component: plain, `.{variant}`, or sharded with an index."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    index = folder / f"{stem}.safetensors.index{suffix}.json"
    if not index.exists():
        index = folder / f"{stem}{suffix}.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}: pass --variant)" if others else (
        " (only .bin weights? convert them to safetensors first)" if list(folder.glob("*.bin")) else "")
    raise ConversionError(f"no {single.name} in {folder}{hint}")


def pipeline_class(folder) -> str:
    index = Path(folder) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name", "?")
    except (OSError, ValueError):
        return "?"


class DiffusersFolder:
    """{official file name: LazyTensor or array} for a whole diffusers pipeline folder."""

    def __init__(self, folder, variant=None):
        self.folder = Path(folder)
        missing = [c for c in COMPONENTS if c not in OPTIONAL and not (self.folder / c).is_dir()]
        if missing:
            kind = pipeline_class(self.folder)
            kind = f" (its model_index.json says {kind})" if kind != "?" else ""
            raise ConversionError(f"{self.folder} is not a diffusers pipeline folder{kind}: "
                                  f"no {', '.join(c + '/' for c in missing)}")
        self.readers, sgm = [], {}
        try:
            maps = _component_maps(self.folder)
            for component, stem in COMPONENTS.items():
                if component not in maps:
                    continue
                lazy = {}
                for path in _weight_files(self.folder / component, stem, variant):
                    reader = SafetensorsReader(path)
                    self.readers.append(reader)
                    lazy.update({name: LazyTensor(reader, name) for name in reader.tensors})
                try:
                    mapped = maps[component](lazy)
                except (KeyError, ValueError) as e:
                    raise ConversionError(f"{self.folder / component}: {e.args[0] if e.args else e}") from None
                sgm.update(mapped)
        except BaseException:
            self.close()
            raise
        in_file = file_names(sgm)
        self.state = {in_file[name]: value for name, value in sgm.items()}

    def shapes(self) -> dict:
        return {name: tuple(np.shape(v) if not isinstance(v, LazyTensor) else v.shape) for name, v in self.state.items()}

    def source_dtype(self) -> str:
        """The one floating type of the files (what `--dtype keep` keeps)."""
        codes = {r.tensors[n].dtype for r in self.readers for n in r.tensors} & set(FLOATS)
        if len(codes) != 1:
            raise ConversionError(f"{self.folder} mixes {sorted(codes)}: choose an output --dtype")
        return codes.pop()

    def close(self):
        for reader in self.readers:
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

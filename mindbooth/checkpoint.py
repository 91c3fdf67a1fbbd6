"""Loading base and LoRA weights into a model, and saving LoRA checkpoints and training state atomically."""
import json
from pathlib import Path

import mindspore as ms
import numpy as np

from gm.modules.lora import is_lora_name, lora_parameters
from gm.util import load_params
from mindbooth.images import atomic_write
from mindbooth.ckpt_stream import CkptReader, CkptWriter, iter_arrays
from mindbooth.tensor_dtypes import DTYPES

LORA_METADATA = ("lora_rank", "lora_alpha")


def read_checkpoint(path) -> dict:
    """{name: Parameter} from a MindSpore .ckpt or a .safetensors file, with a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    file_format = "safetensors" if path.suffix == ".safetensors" else "ckpt"
    try:
        return ms.load_checkpoint(str(path), format=file_format)
    except Exception as error:  # MindSpore raises bare ValueError/RuntimeError with long C++ traces
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read weights from {path} ({file_format}): {first_line}") from None


def _tensor_names(path) -> list:
    """Names in a weight file, read from its index only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                return list(handle.keys())
        with CkptReader(path) as reader:
            return list(reader.tensors)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ValueError(f"cannot read weights from {path}: {error}") from None


def _iter_tensors(path, names):
    """(name, numpy array) one tensor at a time: peak memory is the model plus one tensor
    (`ms.load_checkpoint` holds about twice the file, which does not fit for full-size SDXL in fp32)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            for name in names:
                yield name, handle.get_tensor(name)
    else:
        yield from iter_arrays(path, names)


def check_weight_files(paths) -> list:
    """From the files' indexes only, before a model is built: `paths` are readable weight files, the first a base
    model, the rest LoRA. Returns the names in the first."""
    paths = [p for p in paths if p]
    if not paths:
        raise ValueError("no weights given: pass --weight path/to/base.ckpt[,path/to/lora.ckpt]")
    names = _tensor_names(paths[0])
    if not any(not is_lora_name(k) and k not in LORA_METADATA for k in names):
        if any(is_lora_name(k) for k in names):
            raise ValueError(f"{paths[0]} holds only LoRA weights; give the base model first: --weight base.ckpt,{paths[0]}")
        raise ValueError(f"{paths[0]} holds no weights")
    for path in paths[1:]:
        if not any(is_lora_name(k) for k in _tensor_names(path)):
            raise ValueError(f"{path} holds no LoRA weights (names with .lora_A./.lora_B.); give the base model first")
    return names


def load_weights(engine, paths, lora_dropout: float = 0.0, skip_prefixes=()):
    """Load `paths` in order: the first is the base model (every non-LoRA parameter must be there),
    the rest are LoRA checkpoints (LoRA is injected on first use with the file's rank and alpha).
    `skip_prefixes`: base-file names of parts the model leaves out (DeepFloyd IF's text encoder, built and freed
    on its own); every other name must still match."""
    paths = [p for p in paths if p]
    names = check_weight_files(paths)
    base_names = [k for k in names if not is_lora_name(k) and k not in LORA_METADATA
                  and not k.startswith(tuple(skip_prefixes))]
    own = dict(engine.parameters_and_names())
    own_base = {n for n in own if not is_lora_name(n)}
    missing = sorted(own_base - set(base_names))
    unexpected = sorted(set(base_names) - own_base)
    if missing or unexpected:
        raise ValueError(
            f"{paths[0]} does not match the model config: {len(missing)} missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    for name, array in _iter_tensors(paths[0], base_names):
        param = own[name]
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{paths[0]}: '{name}' has shape {tuple(array.shape)}, the model expects {tuple(param.shape)}")
        param.set_data(ms.Tensor(array).astype(param.dtype))
    if any(is_lora_name(k) for k in names):  # a base file with LoRA weights in it (e.g. a MindONE full save)
        params = read_checkpoint(paths[0])
        load_lora(engine, {k: v for k, v in params.items() if is_lora_name(k)}, params, paths[0], lora_dropout)
    for path in paths[1:]:
        params = read_checkpoint(path)
        lora = {k: v for k, v in params.items() if is_lora_name(k)}
        load_lora(engine, lora, params, path, lora_dropout)


def lora_rank_alpha(params: dict):
    ranks = {tuple(v.shape)[0] for k, v in params.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"LoRA layers have different ranks {sorted(ranks)}; MindBooth needs one rank per file")
    rank = ranks.pop()
    alpha = float(params["lora_alpha"].asnumpy()) if "lora_alpha" in params else float(rank)  # MindONE: alpha = rank
    return rank, alpha


def load_lora(engine, lora: dict, params: dict, path, lora_dropout: float):
    rank, alpha = lora_rank_alpha({**lora, **{k: params[k] for k in LORA_METADATA if k in params}})
    if not lora_parameters(engine.model):
        engine.add_unet_lora(rank=rank, alpha=alpha, dropout=lora_dropout)
    if any(k.startswith("conditioner.") for k in lora) and not engine.has_text_encoder_lora:  # a --train_text_encoder LoRA
        if engine.conditioner is None:
            raise ValueError(f"{path} has text-encoder LoRA but the text encoders were freed (cache_latents)")
        engine.add_text_encoder_lora(rank=rank, alpha=alpha, dropout=lora_dropout)
    own = lora_parameters(engine)
    unexpected = sorted(set(lora) - set(own))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} LoRA weights have no layer in this model (first: {unexpected[:3]})")
    for layer_name in {k.rsplit(".lora_", 1)[0] for k in lora}:
        layer = _layer(engine, layer_name)
        if layer.rank != rank:
            raise ValueError(f"{path} has LoRA rank {rank} but the model's LoRA has rank {layer.rank}; load one LoRA at a time")
        layer.scale = alpha / rank
    load_params(engine, lora, strict=False, what=str(path))


def _layer(engine, layer_name):
    cells = dict(engine.cells_and_names())
    return cells[layer_name]


def save_checkpoint_atomic(params: dict, path, metadata: dict = None):
    """Save {name: Parameter/Tensor/array} (+ scalar metadata) as a .ckpt; a crash never leaves a partial file."""
    entries = [{"name": k, "data": v if isinstance(v, (ms.Tensor, ms.Parameter)) else ms.Tensor(v)} for k, v in params.items()]
    for key, value in (metadata or {}).items():
        entries.append({"name": key, "data": ms.Tensor(np.array(value, dtype=np.float32))})
    atomic_write(path, lambda temporary: ms.save_checkpoint(entries, temporary))


def save_lora(engine, path, rank: int, alpha: float):
    save_checkpoint_atomic({k: v.value() for k, v in lora_parameters(engine).items()}, path, {"lora_rank": rank, "lora_alpha": alpha})


def save_full_model(engine, path, base_path):
    """The whole model after full fine-tuning as one .ckpt in the base file's key layout: every tensor the base file
    `base_path` holds, under its name and in its order, with the engine's current value, or the base file's own
    where the engine no longer holds it (encoders freed by cache_latents, free_encoders). Written one tensor at a
    time (no second copy of the model in memory) through a temporary file, so a crash leaves no partial file."""
    names = _tensor_names(base_path)
    own = {name: param for name, param in engine.parameters_and_names() if not is_lora_name(name)}
    unsaved = sorted(set(own) - set(names))
    if unsaved:
        raise ValueError(f"{base_path} lacks {len(unsaved)} of the model's weights (first: {unsaved[:3]}); "
                         "the full model is saved in the base file's layout")
    from_base = [name for name in names if name not in own]
    base_arrays = _iter_tensors(base_path, from_base)

    def write(temporary):
        with open(temporary, "wb") as handle:
            writer = CkptWriter(handle)
            for name in names:
                if name in own:
                    array = own[name].asnumpy()
                else:  # in file order, as _iter_tensors yields them
                    base_name, array = next(base_arrays)
                    assert base_name == name, (base_name, name)
                writer.write(name, _dtype_code(array.dtype), array)

    atomic_write(path, write)


def _dtype_code(dtype) -> str:
    """The safetensors code of a numpy dtype (CkptWriter's `dtype`)."""
    codes = [code for code, (storage, _) in DTYPES.items() if np.dtype(storage) == np.dtype(dtype) and code != "BF16"]
    if not codes:
        raise ValueError(f"no checkpoint type for numpy {dtype}")
    return codes[0]


def load_trained_weights(engine, path, names):
    """Set the parameters `names` of `engine` from the full-model .ckpt `path` (save_full_model), one tensor at a
    time; a name the file lacks is a ValueError."""
    own = dict(engine.parameters_and_names())
    missing = sorted(set(names) - set(_tensor_names(path)))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} trained weights (first: {missing[:3]}): it was saved for "
                         "another model or finetune mode")
    for name, array in _iter_tensors(path, names):
        param = own[name]
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{path}: '{name}' has shape {tuple(array.shape)}, the model expects {tuple(param.shape)}")
        param.set_data(ms.Tensor(array).astype(param.dtype))


def save_json_atomic(data: dict, path):
    atomic_write(path, lambda temporary: Path(temporary).write_text(json.dumps(data, indent=1)))

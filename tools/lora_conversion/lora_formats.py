"""UNet LoRA in three formats, and the merge math; every function works on {name: numpy array}.

Inside, a LoRA is {layer: LoraLayer(down, up, alpha)}: `layer` is the official (sgm) path of an attention
projection in the UNet (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), down = A (rank, in),
up = B (out, rank), and the layer adds (alpha / rank) * up @ down to its weight. The formats differ in
names and in where alpha lives:

  mindbooth  MindSpore .ckpt: `model.diffusion_model.<layer>.lora_A.weight` / `.lora_B.weight` and one
             `lora_alpha` (+ `lora_rank`) scalar per file; without `lora_alpha`, alpha = rank (MindONE).
  diffusers  PEFT safetensors: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`; alpha in the header
             entry `lora_adapter_metadata` (JSON LoraConfig kwargs with `unet.` in front), which
             `load_lora_weights` / `load_lora_adapter` read. Without it diffusers takes alpha = rank.
             Read also: the older attention-processor names `…attn1.processor.to_q_lora.down.weight`.
  kohya      webui safetensors (A1111, ComfyUI): `lora_unet_<layer, dots as _>.lora_down.weight` /
             `.lora_up.weight` / `.alpha` per layer. sd-scripts names SDXL UNet modules by the sgm layout
             (`lora_unet_input_blocks_4_1_…`); the diffusers layout (`lora_unet_down_blocks_1_…`) is read too.
"""
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tools.model_conversion.diffusers_unet import diffusers_name_to_official, official_name_to_diffusers
from tools.model_conversion.dtypes import ConversionError

MINDBOOTH_PREFIX = "model.diffusion_model."
DIFFUSERS_PREFIX = "unet."
KOHYA_PREFIX = "lora_unet_"
MINDBOOTH_METADATA = ("lora_rank", "lora_alpha")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SDXL_LAYERS_PER_BLOCK = 2

_PROJECTION = r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
OFFICIAL_LAYER = re.compile(
    rf"(?:input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\.transformer_blocks\.\d+\.{_PROJECTION}")
DIFFUSERS_LAYER = re.compile(
    rf"(?:down_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0|up_blocks\.\d+\.attentions\.\d+)"
    rf"\.transformer_blocks\.\d+\.{_PROJECTION}")
# kohya names join everything with "_": rebuild the dots from the known structure.
_KOHYA_PROJECTION = r"(attn[12])_(to_q|to_k|to_v|to_out_0)"
_KOHYA_SGM = re.compile(rf"(input_blocks|output_blocks)_(\d+)_1_transformer_blocks_(\d+)_{_KOHYA_PROJECTION}")
_KOHYA_SGM_MIDDLE = re.compile(rf"middle_block_1_transformer_blocks_(\d+)_{_KOHYA_PROJECTION}")
_KOHYA_DIFFUSERS = re.compile(
    rf"(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_transformer_blocks_(\d+)_{_KOHYA_PROJECTION}")
_KOHYA_DIFFUSERS_MID = re.compile(rf"mid_block_attentions_0_transformer_blocks_(\d+)_{_KOHYA_PROJECTION}")
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
# a MindONE full save also holds the text encoders and the VAE; their weights are skipped
_MINDBOOTH_MARKERS = (MINDBOOTH_PREFIX, "conditioner.", "first_stage_model.")
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
_SUPPORTED = "MindBooth LoRA covers the UNet attention projections to_q/to_k/to_v/to_out.0 of attn1/attn2 only"


@dataclass
class LoraLayer:
    down: np.ndarray  # A, (rank, in)
    up: np.ndarray  # B, (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _scalar(value) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ConversionError(f"expected a scalar, got an array of shape {array.shape}")
    return float(array.reshape(-1)[0])


def _layer(down, up, alpha, name) -> LoraLayer:
    down, up = np.asarray(down), np.asarray(up)
    if down.ndim != 2 or up.ndim != 2:
        raise ConversionError(f"'{name}': LoRA weights of shape {down.shape} / {up.shape} are not a linear "
                              f"layer's (conv LoRA is not supported; {_SUPPORTED})")
    if down.shape[0] != up.shape[1]:
        raise ConversionError(f"'{name}': down/A {down.shape} and up/B {up.shape} do not share a rank")
    return LoraLayer(down, up, float(down.shape[0]) if alpha is None else float(alpha))


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _pairs(state: dict, parse, source: str) -> dict:
    """{layer: {"down"/"up"/"alpha": value}} from keys that `parse` maps to (layer, part), else an error."""
    found = {}
    for name, value in state.items():
        layer, part = parse(name)
        found.setdefault(layer, {})[part] = value
    for layer, parts in found.items():
        if "down" not in parts or "up" not in parts:
            missing = "down/A" if "down" not in parts else "up/B"
            raise ConversionError(f"{source}: LoRA layer '{layer}' has no {missing} weight")
    if not found:
        raise ConversionError(f"{source}: no LoRA weights found")
    return found


# ---------------------------------------------------------------- detection

def _is_text_encoder(name: str) -> bool:
    return name.startswith(_TEXT_ENCODER_PREFIXES)


def detect_format(names) -> str:
    """'mindbooth', 'diffusers' or 'kohya' from the key names (text-encoder keys are ignored here)."""
    kinds = set()
    for name in names:
        if _is_text_encoder(name):
            continue
        if name.startswith(KOHYA_PREFIX):
            kinds.add("kohya")
        elif name.startswith(_MINDBOOTH_MARKERS) or name in MINDBOOTH_METADATA:
            kinds.add("mindbooth")
        elif ".lora_A." in name or ".lora_B." in name or _PROCESSOR.fullmatch(name):
            kinds.add("diffusers")
        else:
            raise ConversionError(f"unknown LoRA key '{name}': not a MindBooth, diffusers/PEFT or kohya UNet LoRA name")
    if not kinds:
        raise ConversionError("no UNet LoRA weights found (only text-encoder keys, or an empty file)")
    if len(kinds) > 1:
        raise ConversionError(f"the file mixes LoRA formats {sorted(kinds)}; convert one format at a time")
    return kinds.pop()


def split_text_encoder(state: dict, drop_text_encoder: bool):
    """Remove text-encoder LoRA keys (error unless `drop_text_encoder`); returns (unet state, dropped count)."""
    te = [k for k in state if _is_text_encoder(k)]
    dropped = set(te)
    if te and not drop_text_encoder:
        raise ConversionError(f"the file has {len(te)} text-encoder LoRA weights (e.g. '{te[0]}'), which MindBooth "
                              f"does not support ({_SUPPORTED}); pass --drop_text_encoder to keep the UNet part only")
    return {k: v for k, v in state.items() if k not in dropped}, len(te)


# ---------------------------------------------------------------- MindBooth (MindONE names)

def from_mindbooth(state: dict):
    """MindBooth checkpoint dict -> ({layer: LoraLayer}, number of non-LoRA entries skipped, e.g. base weights
    of a MindONE full save)."""
    alpha = _scalar(state["lora_alpha"]) if "lora_alpha" in state else None
    lora = {k: v for k, v in state.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    skipped = len(state) - len(lora) - sum(k in state for k in MINDBOOTH_METADATA)

    def parse(name):
        layer = name[len(MINDBOOTH_PREFIX):-len(".lora_A.weight")]
        if not name.startswith(MINDBOOTH_PREFIX) or not OFFICIAL_LAYER.fullmatch(layer):
            raise ConversionError(f"LoRA weight '{name}' is not on a UNet attention projection ({_SUPPORTED})")
        return layer, "down" if name.endswith(".lora_A.weight") else "up"

    pairs = _pairs(lora, parse, "MindBooth checkpoint")
    layers = {layer: _layer(p["down"], p["up"], alpha, MINDBOOTH_PREFIX + layer) for layer, p in pairs.items()}
    return layers, skipped


def to_mindbooth(layers: dict, uniform_rank: bool = False) -> dict:
    """{layer: LoraLayer} -> MindBooth checkpoint dict (fp32, + `lora_rank`/`lora_alpha` scalars).

    The file has one alpha; a layer's scale is lora_alpha / its rank. Layers whose own alpha gives another
    scale get the ratio folded into B (exact up to one rounding). `uniform_rank` zero-pads every layer to the
    largest rank (B A unchanged), for loaders that need one rank per file."""
    rank_max = max(layer.rank for layer in layers.values())
    stored_rank = {name: rank_max if uniform_rank else layer.rank for name, layer in layers.items()}
    # the file's alpha: the one most layers need, so that they keep B bit for bit
    wanted = {name: layer.alpha if stored_rank[name] == layer.rank else layer.alpha * stored_rank[name] / layer.rank
              for name, layer in layers.items()}
    alpha = float(np.float32(_most_common(wanted.values())))  # as the file will hold it
    out = {}
    for name, layer in layers.items():
        down, up = layer.down.astype(np.float32), layer.up.astype(np.float32)
        fold = wanted[name] / alpha
        if fold != 1.0:
            up = (up * np.float32(fold)).astype(np.float32)
        if stored_rank[name] != layer.rank:
            pad = stored_rank[name] - layer.rank
            down = np.concatenate([down, np.zeros((pad, down.shape[1]), np.float32)], axis=0)
            up = np.concatenate([up, np.zeros((up.shape[0], pad), np.float32)], axis=1)
        out[f"{MINDBOOTH_PREFIX}{name}.lora_A.weight"] = down
        out[f"{MINDBOOTH_PREFIX}{name}.lora_B.weight"] = up
    out["lora_rank"] = np.array(_most_common(stored_rank.values()), np.float32)
    out["lora_alpha"] = np.array(alpha, np.float32)
    return out


# ---------------------------------------------------------------- diffusers / PEFT

def _official(diffusers_path: str, layers_per_block: int, key: str) -> str:
    if not DIFFUSERS_LAYER.fullmatch(diffusers_path):
        raise ConversionError(f"LoRA weight '{key}' is not on a UNet attention projection ({_SUPPORTED})")
    return diffusers_name_to_official(diffusers_path, layers_per_block)


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of the module path (a leading ^ anchors it)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def unpack_adapter_metadata(header_metadata: dict):
    """The UNet's LoraConfig kwargs from a safetensors header (None when the file has none)."""
    raw = (header_metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except ValueError:
        raise ConversionError(f"the '{LORA_ADAPTER_METADATA_KEY}' header entry is not JSON") from None
    if any(k.startswith(DIFFUSERS_PREFIX) for k in packed):  # a pipeline save: one prefix per component
        return {k[len(DIFFUSERS_PREFIX):]: v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
    if any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in packed):
        return None
    return packed


def from_diffusers(state: dict, adapter_config: dict = None, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> dict:
    """diffusers/PEFT (or attention-processor) LoRA dict -> {layer: LoraLayer}. `adapter_config` is the
    unpacked `lora_adapter_metadata`; without it alpha = rank, as diffusers assumes."""
    def parse(name):
        key = name[len(DIFFUSERS_PREFIX):] if name.startswith(DIFFUSERS_PREFIX) else name
        if m := _PROCESSOR.fullmatch(key):
            path = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
            return path, m.group(3)
        for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if key.endswith(suffix):
                return key[:-len(suffix)], part
        raise ConversionError(f"unknown diffusers LoRA key '{name}' (expected …lora_A.weight / …lora_B.weight; "
                              f"DoRA, LoRA biases and other adapters are not supported)")

    config = dict(adapter_config or {})
    if config.get("use_dora"):
        raise ConversionError("DoRA adapters are not supported; MindBooth loads plain LoRA")
    layers = {}
    for path, parts in _pairs(state, parse, "diffusers LoRA").items():
        rank = int(np.asarray(parts["down"]).shape[0])
        if adapter_config is None:
            alpha = rank
        else:  # LoraConfig defaults: r 8, lora_alpha 8
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
                alpha = alpha * math.sqrt(rank)
        layers[_official(path, layers_per_block, path)] = _layer(parts["down"], parts["up"], alpha, path)
    return layers


def to_diffusers(layers: dict, layers_per_block: int = SDXL_LAYERS_PER_BLOCK):
    """{layer: LoraLayer} -> ({`unet.<path>.lora_A.weight`: A, ...}, LoraConfig kwargs for `lora_adapter_metadata`)."""
    paths = {name: official_name_to_diffusers(name, layers_per_block) for name in layers}
    rank = _most_common(layer.rank for layer in layers.values())
    alpha = _most_common(layer.alpha for layer in layers.values())
    state = {}
    for name, layer in layers.items():
        state[f"{DIFFUSERS_PREFIX}{paths[name]}.lora_A.weight"] = layer.down
        state[f"{DIFFUSERS_PREFIX}{paths[name]}.lora_B.weight"] = layer.up
    config = {
        "r": rank,
        "lora_alpha": alpha,
        # "^" anchors a pattern to the whole module path (peft >= 0.14); only layers off the common value
        "rank_pattern": {f"^{paths[n]}": layer.rank for n, layer in layers.items() if layer.rank != rank},
        "alpha_pattern": {f"^{paths[n]}": layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "target_modules": sorted(paths.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }
    return state, config


# ---------------------------------------------------------------- kohya / webui

def _kohya_layer(module: str, layers_per_block: int, key: str) -> str:
    if m := _KOHYA_SGM.fullmatch(module):
        kind, block, depth, attn, proj = m.groups()
        return f"{kind}.{block}.1.transformer_blocks.{depth}.{attn}.{proj.replace('to_out_0', 'to_out.0')}"
    if m := _KOHYA_SGM_MIDDLE.fullmatch(module):
        depth, attn, proj = m.groups()
        return f"middle_block.1.transformer_blocks.{depth}.{attn}.{proj.replace('to_out_0', 'to_out.0')}"
    if m := _KOHYA_DIFFUSERS.fullmatch(module):
        kind, level, j, depth, attn, proj = m.groups()
        path = f"{kind}.{level}.attentions.{j}.transformer_blocks.{depth}.{attn}.{proj.replace('to_out_0', 'to_out.0')}"
        return diffusers_name_to_official(path, layers_per_block)
    if m := _KOHYA_DIFFUSERS_MID.fullmatch(module):
        depth, attn, proj = m.groups()
        path = f"mid_block.attentions.0.transformer_blocks.{depth}.{attn}.{proj.replace('to_out_0', 'to_out.0')}"
        return diffusers_name_to_official(path, layers_per_block)
    raise ConversionError(f"LoRA weight '{key}' is not on a UNet attention projection ({_SUPPORTED})")


def from_kohya(state: dict, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> dict:
    """kohya/webui LoRA dict -> {layer: LoraLayer}; a layer without `.alpha` has alpha = rank."""
    def parse(name):
        module, _, part = name.partition(".")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        if part is None:
            raise ConversionError(f"unknown kohya LoRA key '{name}' (expected .lora_down.weight / .lora_up.weight / "
                                  f".alpha; LoCon, LoHa, DoRA and other networks are not supported)")
        return module, part

    layers = {}
    for module, parts in _pairs(state, parse, "kohya LoRA").items():
        alpha = _scalar(parts["alpha"]) if "alpha" in parts else None
        layer = _kohya_layer(module[len(KOHYA_PREFIX):], layers_per_block, module)
        layers[layer] = _layer(parts["down"], parts["up"], alpha, module)
    return layers


def to_kohya(layers: dict) -> dict:
    """{layer: LoraLayer} -> {`lora_unet_<layer>.lora_down.weight`: A, `.lora_up.weight`: B, `.alpha`: scalar}."""
    state = {}
    for name, layer in layers.items():
        module = KOHYA_PREFIX + name.replace(".", "_")
        state[f"{module}.lora_down.weight"] = layer.down
        state[f"{module}.lora_up.weight"] = layer.up
        state[f"{module}.alpha"] = np.array(layer.alpha, np.float32)
    return state


# ---------------------------------------------------------------- whole files

def read_layers(state: dict, header_metadata: dict = None, layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
                drop_text_encoder: bool = False):
    """Any supported LoRA dict -> ({layer: LoraLayer}, info {"format", "dropped_text_encoder", "skipped"})."""
    state, dropped = split_text_encoder(state, drop_text_encoder)
    fmt = detect_format(state)
    skipped = 0
    if fmt == "mindbooth":
        layers, skipped = from_mindbooth(state)
    elif fmt == "diffusers":
        layers = from_diffusers(state, unpack_adapter_metadata(header_metadata), layers_per_block)
    else:
        layers = from_kohya(state, layers_per_block)
    return layers, {"format": fmt, "dropped_text_encoder": dropped, "skipped": skipped}


def export_metadata(fmt: str, layers: dict, base_model: str = "", instance_prompt: str = "",
                    adapter_config: dict = None) -> dict:
    """safetensors header strings: what the LoRA is (both formats) plus what each ecosystem reads."""
    ranks = {layer.rank for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    rank = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"  # kohya's word for per-layer values
    alpha = repr(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    meta = {
        "format": "pt",
        "lora_format": fmt,
        "lora_rank": rank,
        "lora_alpha": alpha,
        "base_model": base_model,
        "instance_prompt": instance_prompt,
        "generator": "MindBooth",
    }
    if fmt == "diffusers":
        packed = {f"{DIFFUSERS_PREFIX}{k}": v for k, v in adapter_config.items()}
        meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    elif fmt == "kohya":
        meta.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": rank,
            "ss_network_alpha": alpha,
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "ss_sd_model_name": base_model,
            "ss_training_comment": f"instance prompt: {instance_prompt}" if instance_prompt else "",
        })
    return meta


def fold_alpha(layers: dict) -> dict:
    """The same LoRA with each layer's scale folded into B and alpha = rank (scale 1), for loaders that ignore
    alpha (e.g. diffusers' `load_lora_adapter` given a file path without `use_safetensors=True`)."""
    return {name: LoraLayer(layer.down, (layer.up * np.float32(layer.scale)).astype(layer.up.dtype), float(layer.rank))
            for name, layer in layers.items()}


def export_lora(state: dict, fmt: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK, base_model: str = "",
                instance_prompt: str = "", fold: bool = False):
    """MindBooth checkpoint dict -> (safetensors dict, header metadata) in `fmt` ('diffusers' or 'kohya').
    `fold` writes alpha = rank with the scale folded into B (see fold_alpha)."""
    if detect_format(state) != "mindbooth":
        raise ConversionError("the input is not a MindBooth LoRA checkpoint "
                              "(names model.diffusion_model.….lora_A.weight)")
    layers, _ = from_mindbooth(state)
    if fold:
        layers = fold_alpha(layers)
    if fmt == "diffusers":
        tensors, config = to_diffusers(layers, layers_per_block)
        return tensors, export_metadata(fmt, layers, base_model, instance_prompt, config)
    if fmt == "kohya":
        return to_kohya(layers), export_metadata(fmt, layers, base_model, instance_prompt)
    raise ConversionError(f"unknown export format {fmt!r}: choose diffusers or kohya")


# ---------------------------------------------------------------- merge

def merge_deltas(layers: dict, scale: float = 1.0) -> dict:
    """{base weight name (MindSpore/official): scale * (alpha / rank) * B @ A}, fp32."""
    return {
        f"{MINDBOOTH_PREFIX}{name}.weight":
            (np.float32(scale * layer.scale) * (layer.up.astype(np.float32) @ layer.down.astype(np.float32)))
        for name, layer in layers.items()
    }

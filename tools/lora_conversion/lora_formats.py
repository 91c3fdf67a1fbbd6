"""UNet and text-encoder LoRA in three formats, and the merge math; every function works on {name: numpy array}.

Inside, a LoRA is {layer: LoraLayer(down, up, alpha)}: `layer` is the official (sgm) path of an attention
projection in the UNet (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`; DeepFloyd IF: its diffusers path,
`down_blocks.1.attentions.0.add_k_proj`, which is also IF's name in MindBooth), or the MindBooth path of a
text-encoder self-attention projection (CLIP `conditioner.embedders.0.…self_attn.q_proj`, OpenCLIP
`conditioner.embedders.E.model.….attn.in_proj_lora.q_proj`; see text_encoder_names); down = A (rank, in),
up = B (out, rank), and the layer adds (alpha / rank) * up @ down to its weight. The names in the other formats
depend on the model family (lora_family.LoraFamily, from --config; SDXL base without). The formats differ in
names and in where alpha lives:

  mindbooth  MindSpore .ckpt: `model.diffusion_model.<layer>.lora_A.weight` / `.lora_B.weight` (UNet),
             `<layer>.lora_A.weight` (text encoders, `conditioner.…`) and one `lora_alpha` (+ `lora_rank`)
             scalar per file; without `lora_alpha`, alpha = rank (MindONE).
  diffusers  PEFT safetensors: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.…`
             (SD 1.x CLIP-L, SD 2.x OpenCLIP ViT-H, SDXL CLIP-L), `text_encoder_2.…` (SDXL bigG); alpha in the
             header entry `lora_adapter_metadata`: one JSON LoraConfig per component with its name in front
             (`unet.r`, `text_encoder.lora_alpha`), as `save_lora_weights` writes it and `load_lora_weights` /
             `load_lora_adapter` read it. Without it diffusers takes alpha = rank. Read also: the older
             attention-processor names (`…attn1.processor.to_q_lora.down.weight`,
             `…self_attn.q_proj.lora_linear_layer.down.weight`).
  kohya      webui safetensors (A1111, ComfyUI): `lora_unet_<module, dots as _>.lora_down.weight` /
             `.lora_up.weight` / `.alpha` per layer; `lora_te_…` (SD 1.x/2.x) or `lora_te1_…` / `lora_te2_…`
             (SDXL) for the text encoders. sd-scripts names SDXL UNet modules by the sgm layout
             (`lora_unet_input_blocks_4_1_…`) and SD 1.x/2.x ones by the diffusers layout
             (`lora_unet_down_blocks_0_attentions_0_…`); both are read for any family. No IF names (refused).
"""
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mindbooth.tensor_dtypes import ConversionError
from tools.lora_conversion import text_encoder_names as te
from tools.lora_conversion.lora_family import SDXL_FAMILY, LoraFamily, is_if_layer
from tools.model_conversion.diffusers_unet import diffusers_name_to_official, official_name_to_diffusers

MINDBOOTH_PREFIX = "model.diffusion_model."
KOHYA_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")  # lora_te_: SD1.x's one encoder, read as CLIP-L
DIFFUSERS_COMPONENTS = ("unet",) + te.DIFFUSERS_ENCODERS
MINDBOOTH_METADATA = ("lora_rank", "lora_alpha")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

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
# IF's LoRAAttnAddedKVProcessor also had add_k_proj_lora / add_v_proj_lora
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\.(down|up)\.weight")
_DIFFUSERS_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                       (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"))
_DIFFUSERS_PARTS = ("lora_A", "lora_B", "lora_linear_layer")
# a MindONE full save also holds the text encoders and the VAE; their weights are skipped
_MINDBOOTH_MARKERS = (MINDBOOTH_PREFIX, "conditioner.", "first_stage_model.")
_TEXT_ENCODER_PREFIXES = KOHYA_TEXT_PREFIXES + tuple(f"{c}." for c in te.DIFFUSERS_ENCODERS)
_SUPPORTED = ("MindBooth LoRA covers the UNet attention projections to_q/to_k/to_v/to_out.0 of attn1/attn2 "
              "(DeepFloyd IF: also add_k_proj/add_v_proj of attentions.N) and the text encoders' self-attention "
              "q/k/v/out_proj only")
NO_KOHYA_FOR_IF = ("DeepFloyd IF LoRA has no kohya (A1111/ComfyUI) format: no webui runs IF; use --task "
                   "ms_to_diffusers (what IFPipeline.load_lora_weights reads)")


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


def _text_layer(layer, key: str) -> str:
    """`layer` (a text-encoder layer the name tables found, or None) or a one-line error about `key`."""
    if layer is None:
        raise ConversionError(f"LoRA weight '{key}' is not on a text-encoder self-attention projection "
                              f"q/k/v/out_proj ({_SUPPORTED})")
    return layer


def mindbooth_path(layer: str) -> str:
    """The layer's module path in a MindBooth checkpoint (UNet layers live under `model.diffusion_model.`)."""
    return layer if te.is_text_encoder_layer(layer) else MINDBOOTH_PREFIX + layer


# ---------------------------------------------------------------- detection

def _is_text_encoder(name: str) -> bool:
    """A text-encoder LoRA key in any format (MindBooth's `conditioner.` also names the encoders' base weights)."""
    return name.startswith(_TEXT_ENCODER_PREFIXES) or (name.startswith("conditioner.") and
                                                        name.endswith((".lora_A.weight", ".lora_B.weight")))


def detect_format(names) -> str:
    """'mindbooth', 'diffusers' or 'kohya' from the key names."""
    kinds = set()
    for name in names:
        if name.startswith((KOHYA_PREFIX,) + KOHYA_TEXT_PREFIXES):
            kinds.add("kohya")
        elif name.startswith(_MINDBOOTH_MARKERS) or name in MINDBOOTH_METADATA:
            kinds.add("mindbooth")
        elif (name.startswith(_TEXT_ENCODER_PREFIXES) or any(f".{p}." in name for p in _DIFFUSERS_PARTS)
              or _PROCESSOR.fullmatch(name)):
            kinds.add("diffusers")
        else:
            raise ConversionError(f"unknown LoRA key '{name}': not a MindBooth, diffusers/PEFT or kohya LoRA name")
    if not kinds:
        raise ConversionError("no LoRA weights found (an empty file)")
    if len(kinds) > 1:
        raise ConversionError(f"the file mixes LoRA formats {sorted(kinds)}; convert one format at a time")
    return kinds.pop()


def split_text_encoder(state: dict, drop_text_encoder: bool):
    """With `drop_text_encoder`, keep only the UNet part; returns (state, number of text-encoder keys dropped)."""
    if not drop_text_encoder:
        return state, 0
    kept = {k: v for k, v in state.items() if not _is_text_encoder(k)}
    dropped = len(state) - len(kept)
    if dropped and not any(k not in MINDBOOTH_METADATA for k in kept):
        raise ConversionError(f"the file has only text-encoder LoRA weights ({dropped}); "
                              f"without --drop_text_encoder they are converted")
    return kept, dropped


# ---------------------------------------------------------------- MindBooth (MindONE names)

def from_mindbooth(state: dict):
    """MindBooth checkpoint dict -> ({layer: LoraLayer}, number of non-LoRA entries skipped, e.g. base weights
    of a MindONE full save)."""
    alpha = _scalar(state["lora_alpha"]) if "lora_alpha" in state else None
    lora = {k: v for k, v in state.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    skipped = len(state) - len(lora) - sum(k in state for k in MINDBOOTH_METADATA)

    def parse(name):
        path, part = name[:-len(".lora_A.weight")], "down" if name.endswith(".lora_A.weight") else "up"
        if te.is_text_encoder_layer(path):
            return _text_layer(path if te.parse_mindbooth(path) else None, name), part
        layer = path[len(MINDBOOTH_PREFIX):]
        if not path.startswith(MINDBOOTH_PREFIX) or not (OFFICIAL_LAYER.fullmatch(layer) or is_if_layer(layer)):
            raise ConversionError(f"LoRA weight '{name}' is not on a UNet attention projection ({_SUPPORTED})")
        return layer, part

    pairs = _pairs(lora, parse, "MindBooth checkpoint")
    layers = {layer: _layer(p["down"], p["up"], alpha, mindbooth_path(layer)) for layer, p in pairs.items()}
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
        out[f"{mindbooth_path(name)}.lora_A.weight"] = down
        out[f"{mindbooth_path(name)}.lora_B.weight"] = up
    out["lora_rank"] = np.array(_most_common(stored_rank.values()), np.float32)
    out["lora_alpha"] = np.array(alpha, np.float32)
    return out


# ---------------------------------------------------------------- diffusers / PEFT

def _official(diffusers_path: str, layers_per_block: int, key: str) -> str:
    """The layer of a diffusers UNet path: the sgm path, or the path itself for IF (whose names are diffusers')."""
    if is_if_layer(diffusers_path):
        return diffusers_path
    if not DIFFUSERS_LAYER.fullmatch(diffusers_path):
        raise ConversionError(f"LoRA weight '{key}' is not on a UNet attention projection ({_SUPPORTED})")
    return diffusers_name_to_official(diffusers_path, layers_per_block)


def _pattern_value(patterns: dict, module: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of the module path (a leading ^ anchors it)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def unpack_adapter_metadata(header_metadata: dict) -> dict:
    """{component ('unet', 'text_encoder', 'text_encoder_2'): LoraConfig kwargs} from a safetensors header;
    {} when the file has none."""
    raw = (header_metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        raise ConversionError(f"the '{LORA_ADAPTER_METADATA_KEY}' header entry is not JSON") from None
    # a pipeline save (save_lora_weights): one prefix per component
    configs = {c: {k[len(c) + 1:]: v for k, v in packed.items() if k.startswith(f"{c}.")} for c in DIFFUSERS_COMPONENTS}
    configs = {c: config for c, config in configs.items() if config}
    return configs or {"unet": packed}  # a bare UNet's save_lora_adapter writes no prefix


def _split_component(module: str):
    """`text_encoder_2.text_model.…` -> ('text_encoder_2', 'text_model.…'); a UNet path may come without `unet.`."""
    for component in DIFFUSERS_COMPONENTS:
        if module.startswith(f"{component}."):
            return component, module[len(component) + 1:]
    return "unet", module


def from_diffusers(state: dict, adapter_configs: dict = None, family: LoraFamily = SDXL_FAMILY) -> dict:
    """diffusers/PEFT (or attention-processor) LoRA dict -> {layer: LoraLayer}. `adapter_configs` is the unpacked
    `lora_adapter_metadata` ({component: LoraConfig kwargs}); a component without one has alpha = rank, as
    diffusers assumes."""
    def parse(name):
        if m := _PROCESSOR.fullmatch(name.removeprefix("unet.")):
            return f"unet.{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else ""), m.group(3)
        for suffix, part in _DIFFUSERS_SUFFIXES:
            if name.endswith(suffix):
                return name[:-len(suffix)], part
        raise ConversionError(f"unknown diffusers LoRA key '{name}' (expected …lora_A.weight / …lora_B.weight; "
                              f"DoRA, LoRA biases and other adapters are not supported)")

    configs = adapter_configs or {}
    if any(config.get("use_dora") for config in configs.values()):
        raise ConversionError("DoRA adapters are not supported; MindBooth loads plain LoRA")
    layers = {}
    for module, parts in _pairs(state, parse, "diffusers LoRA").items():
        component, path = _split_component(module)
        if component == "unet":
            layer = _official(path, family.layers_per_block, module)
        else:
            layer = _text_layer(te.from_diffusers(module, family.text_encoders, family.name), module)
        rank = int(np.asarray(parts["down"]).shape[0])
        config = configs.get(component)
        if config is None:
            alpha = rank
        else:  # LoraConfig defaults: r 8, lora_alpha 8
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            if config.get("use_rslora"):  # scale alpha / sqrt(r) == (alpha * sqrt(r)) / r
                alpha = alpha * math.sqrt(rank)
        layers[layer] = _layer(parts["down"], parts["up"], alpha, module)
    return layers


class _PeftName(NamedTuple):
    component: str  # unet, text_encoder, text_encoder_2
    path: str  # module path inside the component, as the file names it
    target: str  # for LoraConfig.target_modules
    pattern: str  # key of rank_pattern / alpha_pattern


def _peft_name(layer: str, family: LoraFamily) -> _PeftName:
    if te.is_text_encoder_layer(layer):
        # the text encoders' targets and patterns are name suffixes (no `^`): peft then finds the module whether
        # or not the CLIPTextModel has transformers 4's `text_model.` level
        component, _, path = te.to_diffusers(layer, family.text_encoders, family.name).partition(".")
        return _PeftName(component, path, te.peft_target(layer), te.peft_target(layer))
    path = layer if is_if_layer(layer) else official_name_to_diffusers(layer, family.layers_per_block)
    # "^" anchors a pattern to the whole module path (peft >= 0.14)
    return _PeftName("unet", path, path, f"^{path}")


def to_diffusers(layers: dict, family: LoraFamily = SDXL_FAMILY):
    """{layer: LoraLayer} -> ({`<component>.<path>.lora_A.weight`: A, ...}, {component: LoraConfig kwargs}) for
    `lora_adapter_metadata`; components: unet and the family's text encoders (text_encoder, SDXL's text_encoder_2)."""
    names = {name: _peft_name(name, family) for name in layers}
    state = {}
    for name, layer in layers.items():
        state[f"{names[name].component}.{names[name].path}.lora_A.weight"] = layer.down
        state[f"{names[name].component}.{names[name].path}.lora_B.weight"] = layer.up
    configs = {}
    for component in DIFFUSERS_COMPONENTS:
        own = {name: layer for name, layer in layers.items() if names[name].component == component}
        if not own:
            continue
        rank = _most_common(layer.rank for layer in own.values())
        alpha = _most_common(layer.alpha for layer in own.values())
        configs[component] = {
            "r": rank,
            "lora_alpha": alpha,
            # only layers off the common value
            "rank_pattern": {names[n].pattern: layer.rank for n, layer in own.items() if layer.rank != rank},
            "alpha_pattern": {names[n].pattern: layer.alpha for n, layer in own.items() if layer.alpha != alpha},
            "target_modules": sorted(names[n].target for n in own),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
        }
    return state, configs


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


def from_kohya(state: dict, family: LoraFamily = SDXL_FAMILY) -> dict:
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
        if module.startswith(KOHYA_TEXT_PREFIXES):
            layer = _text_layer(te.from_kohya(module, family.text_encoders, family.name), module)
        else:
            layer = _kohya_layer(module[len(KOHYA_PREFIX):], family.layers_per_block, module)
        layers[layer] = _layer(parts["down"], parts["up"], alpha, module)
    return layers


def kohya_module(layer: str, family: LoraFamily = SDXL_FAMILY) -> str:
    """sd-scripts' module name of a layer: UNet by sgm names for SDXL/SSD-1B (`lora_unet_input_blocks_4_1_…`),
    by diffusers names for SD 1.x/2.x (`lora_unet_down_blocks_1_attentions_0_…`); text encoders
    `lora_te_` / `lora_te1_` / `lora_te2_`."""
    if te.is_text_encoder_layer(layer):
        return te.to_kohya(layer, family.text_encoders, family.name)
    path = layer if family.kohya_sgm_unet else official_name_to_diffusers(layer, family.layers_per_block)
    return KOHYA_PREFIX + path.replace(".", "_")


def to_kohya(layers: dict, family: LoraFamily = SDXL_FAMILY) -> dict:
    """{layer: LoraLayer} -> {`<kohya_module>.lora_down.weight`: A, `.lora_up.weight`: B, `.alpha`: scalar}."""
    state = {}
    for name, layer in layers.items():
        module = kohya_module(name, family)
        state[f"{module}.lora_down.weight"] = layer.down
        state[f"{module}.lora_up.weight"] = layer.up
        state[f"{module}.alpha"] = np.array(layer.alpha, np.float32)
    return state


# ---------------------------------------------------------------- whole files

def read_layers(state: dict, header_metadata: dict = None, family: LoraFamily = SDXL_FAMILY,
                drop_text_encoder: bool = False):
    """Any supported LoRA dict -> ({layer: LoraLayer}, info {"format", "dropped_text_encoder", "skipped"}).
    `drop_text_encoder` keeps the UNet part only."""
    state, dropped = split_text_encoder(state, drop_text_encoder)
    fmt = detect_format(state)
    skipped = 0
    if fmt == "mindbooth":
        layers, skipped = from_mindbooth(state)
    elif fmt == "diffusers":
        layers = from_diffusers(state, unpack_adapter_metadata(header_metadata), family)
    elif family.is_if:
        raise ConversionError(NO_KOHYA_FOR_IF)
    else:
        layers = from_kohya(state, family)
    return layers, {"format": fmt, "dropped_text_encoder": dropped, "skipped": skipped}


def export_metadata(fmt: str, layers: dict, base_model: str = "", instance_prompt: str = "",
                    adapter_configs: dict = None, family: LoraFamily = SDXL_FAMILY) -> dict:
    """safetensors header strings: what the LoRA is (both formats) plus what each ecosystem reads
    (`adapter_configs`: to_diffusers' {component: LoraConfig kwargs})."""
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
        # save_lora_weights' packing: every component's LoraConfig under its own prefix
        packed = {f"{component}.{k}": v for component, config in adapter_configs.items() for k, v in config.items()}
        meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    elif fmt == "kohya":
        meta.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": rank,
            "ss_network_alpha": alpha,
            "ss_base_model_version": family.kohya_version,
            "ss_v2": str(family.v2),
            "ss_v_parameterization": str(family.v_parameterization),
            "ss_network_train_unet_only": str(not any(te.is_text_encoder_layer(name) for name in layers)),
            "ss_sd_model_name": base_model,
            "ss_training_comment": f"instance prompt: {instance_prompt}" if instance_prompt else "",
        })
    return meta


def fold_alpha(layers: dict) -> dict:
    """The same LoRA with each layer's scale folded into B and alpha = rank (scale 1), for loaders that ignore
    alpha (e.g. diffusers' `load_lora_adapter` given a file path without `use_safetensors=True`)."""
    return {name: LoraLayer(layer.down, (layer.up * np.float32(layer.scale)).astype(layer.up.dtype), float(layer.rank))
            for name, layer in layers.items()}


def export_lora(state: dict, fmt: str, family: LoraFamily = SDXL_FAMILY, base_model: str = "",
                instance_prompt: str = "", fold: bool = False, drop_text_encoder: bool = False):
    """MindBooth checkpoint dict -> (safetensors dict, header metadata) in `fmt` ('diffusers' or 'kohya').
    `fold` writes alpha = rank with the scale folded into B (see fold_alpha); `drop_text_encoder` exports the
    UNet part only."""
    state, _ = split_text_encoder(state, drop_text_encoder)
    if detect_format(state) != "mindbooth":
        raise ConversionError("the input is not a MindBooth LoRA checkpoint "
                              "(names model.diffusion_model.….lora_A.weight, conditioner.….lora_A.weight)")
    layers, _ = from_mindbooth(state)
    if fold:
        layers = fold_alpha(layers)
    if fmt == "diffusers":
        tensors, configs = to_diffusers(layers, family)
        return tensors, export_metadata(fmt, layers, base_model, instance_prompt, configs, family)
    if fmt == "kohya":
        if family.is_if or any(is_if_layer(name) for name in layers):
            raise ConversionError(NO_KOHYA_FOR_IF)
        return to_kohya(layers, family), export_metadata(fmt, layers, base_model, instance_prompt, family=family)
    raise ConversionError(f"unknown export format {fmt!r}: choose diffusers or kohya")


# ---------------------------------------------------------------- merge

def merge_targets(layers: dict) -> dict:
    """{base weight name (MindSpore/official): [(layer, row block or None)]}: where each layer's B A goes.
    bigG's q/k/v share one fused in_proj_weight, a row block each (see text_encoder_names.base_weight)."""
    targets = {}
    for name in layers:
        if te.is_text_encoder_layer(name):
            weight, block = te.base_weight(name)
        else:
            weight, block = f"{MINDBOOTH_PREFIX}{name}.weight", None
        targets.setdefault(weight, []).append((name, block))
    return targets


def check_targets(layers: dict, shapes: dict, source: str) -> dict:
    """merge_targets(layers), each checked to be a weight of `shapes` ({name: shape}, of the model or base file
    `source`) that the layer's B A fits: a one-line error naming the first that is not."""
    targets = merge_targets(layers)
    missing = [n for n in targets if n not in shapes]
    if missing:
        raise ConversionError(f"{source} has no weight '{missing[0]}' for LoRA layer "
                              f"({len(missing)} of {len(targets)} missing); is it the base model of this LoRA?")
    for name, entries in targets.items():
        for layer, block in entries:
            merge_rows(layers[layer], block, shapes[name], name)
    return targets


def merge_rows(layer: LoraLayer, block, shape, weight: str) -> slice:
    """The rows of the base weight (of `shape`) that take the layer's B A: all of them, or row block `block` of a
    fused q|k|v weight; a one-line error if B A does not fit there."""
    out, inputs = layer.up.shape[0], layer.down.shape[1]
    expected = (out, inputs) if block is None else (len(te.FUSED_ROW_BLOCKS) * out, inputs)
    if tuple(shape) != expected:
        raise ConversionError(f"base weight '{weight}' has shape {tuple(shape)}; the LoRA's B A {(out, inputs)} "
                              f"needs {expected}")
    return slice(None) if block is None else slice(block * out, (block + 1) * out)


def merge_delta(layers: dict, entries, shape, scale: float = 1.0, weight: str = "") -> np.ndarray:
    """scale * (alpha / rank) * B A of every (layer, block) in `entries`, placed in an fp32 array of `shape`."""
    delta = np.zeros(shape, np.float32)
    for name, block in entries:
        layer = layers[name]
        rows = merge_rows(layer, block, shape, weight)
        delta[rows] += np.float32(scale * layer.scale) * (layer.up.astype(np.float32) @ layer.down.astype(np.float32))
    return delta


def merge_deltas(layers: dict, scale: float = 1.0) -> dict:
    """{base weight name: its whole fp32 delta} (a fused weight's shape follows from its q/k/v blocks)."""
    deltas = {}
    for weight, entries in merge_targets(layers).items():
        name, block = entries[0]
        rows = layers[name].up.shape[0] * (1 if block is None else len(te.FUSED_ROW_BLOCKS))
        deltas[weight] = merge_delta(layers, entries, (rows, layers[name].down.shape[1]), scale, weight)
    return deltas

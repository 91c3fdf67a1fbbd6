"""Names of text-encoder LoRA layers: MindBooth <-> diffusers/PEFT <-> kohya, per model family.

A layer is one attention projection that carries a LoRA (down = A, up = B). MindBooth names say which
embedder and which kind of tower it is on, whatever the family:
  CLIP (transformers layout; SD 1.x's, SDXL's first):
             `conditioner.embedders.E.transformer.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`
  OpenCLIP (fused in_proj; SD 2.x's ViT-H, SDXL's bigG):
             `conditioner.embedders.E.model.transformer.resblocks.N.attn.in_proj_lora.{q,k,v}_proj`
             (one LoRA per row block of the fused in_proj_weight) and `….attn.out_proj`
The other formats name the encoder by its place in the pipeline, each in transformers' CLIPTextModel layout
(separate q/k/v_proj, also for OpenCLIP), so the family says which embedder each one is (`TextEncoder`):
  diffusers  `text_encoder.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`, `text_encoder_2.…` (SDXL)
  kohya      `lora_te_text_model_encoder_layers_N_self_attn_{q,k,v,out}_proj` (SD 1.x/2.x), `lora_te1_…`/`lora_te2_…`

A layer's B A adds to `<layer>.weight`, except OpenCLIP's q/k/v: row block 0/1/2 of the fused
`….attn.in_proj_weight` (rows q|k|v, each width x width).
"""
import re
from dataclasses import dataclass

from mindbooth.tensor_dtypes import ConversionError


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: where MindBooth keeps it and what the other formats call it."""
    embedder: int  # conditioner.embedders.<embedder>
    fused: bool  # an OpenCLIP tower (fused in_proj) rather than transformers' CLIP
    diffusers: str  # pipeline component: text_encoder, text_encoder_2
    kohya: str  # lora_<kohya>_ prefix: te, te1, te2
    what: str  # for messages


SD1_ENCODERS = (TextEncoder(0, False, "text_encoder", "te", "CLIP ViT-L"),)
SD2_ENCODERS = (TextEncoder(0, True, "text_encoder", "te", "OpenCLIP ViT-H"),)
SDXL_ENCODERS = (TextEncoder(0, False, "text_encoder", "te1", "CLIP ViT-L"),
                 TextEncoder(1, True, "text_encoder_2", "te2", "OpenCLIP bigG"))

CLIP_LAYER = "conditioner.embedders.{embedder}.transformer.text_model.encoder.layers.{layer}.self_attn.{proj}_proj"
OPEN_CLIP_FUSED_LAYER = "conditioner.embedders.{embedder}.model.transformer.resblocks.{layer}.attn.in_proj_lora.{proj}_proj"
OPEN_CLIP_OUT_LAYER = "conditioner.embedders.{embedder}.model.transformer.resblocks.{layer}.attn.out_proj"
OPEN_CLIP_IN_PROJ_WEIGHT = "conditioner.embedders.{embedder}.model.transformer.resblocks.{layer}.attn.in_proj_weight"
FUSED_ROW_BLOCKS = ("q", "k", "v")
DIFFUSERS_LAYER = "{encoder}.text_model.encoder.layers.{layer}.self_attn.{proj}_proj"
KOHYA_LAYER = "lora_{encoder}_text_model_encoder_layers_{layer}_self_attn_{proj}_proj"
DIFFUSERS_ENCODERS = ("text_encoder", "text_encoder_2")

# (fused, pattern): groups embedder, layer, proj
_MINDBOOTH = [
    (False, re.compile(r"conditioner\.embedders\.(\d+)\.transformer\.text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj")),
    (True, re.compile(r"conditioner\.embedders\.(\d+)\.model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_lora\.(q|k|v)_proj")),
    (True, re.compile(r"conditioner\.embedders\.(\d+)\.model\.transformer\.resblocks\.(\d+)\.attn\.(out)_proj")),
]
# transformers >= 5 saves CLIPTextModel without `text_model.`; diffusers reads both
_DIFFUSERS = re.compile(r"(text_encoder|text_encoder_2)\.(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj")
_KOHYA = re.compile(r"lora_(te1|te2|te)_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj")


def is_text_encoder_layer(layer: str) -> bool:
    return layer.startswith("conditioner.")


def parse_mindbooth(layer: str):
    """MindBooth layer path -> (embedder index, fused, layer index, 'q'|'k'|'v'|'out'), or None if not a
    text-encoder LoRA layer."""
    for fused, pattern in _MINDBOOTH:
        match = pattern.fullmatch(layer)
        if match:
            return int(match.group(1)), fused, int(match.group(2)), match.group(3)
    return None


def mindbooth_layer(encoder: TextEncoder, layer: int, proj: str) -> str:
    if not encoder.fused:
        return CLIP_LAYER.format(embedder=encoder.embedder, layer=layer, proj=proj)
    template = OPEN_CLIP_OUT_LAYER if proj == "out" else OPEN_CLIP_FUSED_LAYER
    return template.format(embedder=encoder.embedder, layer=layer, proj=proj)


def _wrong_family(found: str, encoders, family: str) -> ConversionError:
    has = " and ".join(f"{e.what} ({e.diffusers}, lora_{e.kohya}_, conditioner.embedders.{e.embedder})"
                       for e in encoders)
    return ConversionError(f"the LoRA has text-encoder layers on {found}, but {family} has {has}: "
                           f"pass the --config of the LoRA's base model")


def encoder_of(layer: str, encoders=SDXL_ENCODERS, family: str = "SDXL") -> TextEncoder:
    """The family's TextEncoder that a MindBooth text-encoder layer is on; a one-line error if it has none there."""
    embedder, fused, _, _ = _parsed(layer)
    for encoder in encoders:
        if encoder.embedder == embedder and encoder.fused == fused:
            return encoder
    kind = "an OpenCLIP tower" if fused else "a CLIP ViT-L"
    raise _wrong_family(f"{kind} at conditioner.embedders.{embedder}", encoders, family)


def to_diffusers(layer: str, encoders=SDXL_ENCODERS, family: str = "SDXL") -> str:
    _, _, index, proj = _parsed(layer)
    return DIFFUSERS_LAYER.format(encoder=encoder_of(layer, encoders, family).diffusers, layer=index, proj=proj)


def to_kohya(layer: str, encoders=SDXL_ENCODERS, family: str = "SDXL") -> str:
    _, _, index, proj = _parsed(layer)
    return KOHYA_LAYER.format(encoder=encoder_of(layer, encoders, family).kohya, layer=index, proj=proj)


def peft_target(layer: str) -> str:
    """The layer's module name as peft matches it inside its text encoder (target_modules, rank/alpha patterns):
    without `text_model.`, which transformers >= 5 drops; as a name suffix it finds the module in either layout."""
    _, _, index, proj = _parsed(layer)
    return f"encoder.layers.{index}.self_attn.{proj}_proj"


def base_weight(layer: str):
    """(base weight name, row block) that the layer's B A adds to: OpenCLIP q/k/v -> (its in_proj_weight, 0/1/2),
    every other layer -> (`<layer>.weight`, None)."""
    embedder, fused, index, proj = _parsed(layer)
    if fused and proj != "out":
        return OPEN_CLIP_IN_PROJ_WEIGHT.format(embedder=embedder, layer=index), FUSED_ROW_BLOCKS.index(proj)
    return f"{layer}.weight", None


def from_diffusers(path: str, encoders=SDXL_ENCODERS, family: str = "SDXL"):
    """diffusers/PEFT module path -> MindBooth layer path, or None if not a text-encoder projection; a one-line
    error for an encoder the family does not have (`text_encoder_2` with SD 1.x)."""
    match = _DIFFUSERS.fullmatch(path)
    if not match:
        return None
    encoder = next((e for e in encoders if e.diffusers == match.group(1)), None)
    if encoder is None:
        raise _wrong_family(f"'{match.group(1)}' ({path})", encoders, family)
    return mindbooth_layer(encoder, int(match.group(2)), match.group(3))


def from_kohya(module: str, encoders=SDXL_ENCODERS, family: str = "SDXL"):
    """kohya module name -> MindBooth layer path, or None. With two encoders, `lora_te_` (SD 1.x's single
    encoder's prefix) is read as the first; with one, `lora_te1_`/`lora_te2_` are another family's."""
    match = _KOHYA.fullmatch(module)
    if not match:
        return None
    prefix = match.group(1)
    encoder = next((e for e in encoders if e.kohya == prefix), None)
    if encoder is None and prefix == "te" and len(encoders) > 1:
        encoder = encoders[0]
    if encoder is None:
        raise _wrong_family(f"lora_{prefix}_ ({module})", encoders, family)
    return mindbooth_layer(encoder, int(match.group(2)), match.group(3))


def _parsed(layer: str):
    parsed = parse_mindbooth(layer)
    if parsed is None:
        raise ValueError(f"'{layer}' is not a text-encoder LoRA layer (CLIP self_attn q/k/v/out_proj or OpenCLIP attn)")
    return parsed

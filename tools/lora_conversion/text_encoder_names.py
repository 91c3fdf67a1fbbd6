"""Names of text-encoder LoRA layers: MindBooth <-> diffusers/PEFT <-> kohya.

A layer is one attention projection that carries a LoRA (down = A, up = B):
  mindbooth  CLIP-L: `conditioner.embedders.0.transformer.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj`
             bigG:   `conditioner.embedders.1.model.transformer.resblocks.N.attn.in_proj_lora.{q,k,v}_proj`
                     (one LoRA per row block of the fused in_proj_weight) and `….attn.out_proj`
  diffusers  `text_encoder.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj` (CLIP-L),
             `text_encoder_2.…` (bigG, transformers' CLIPTextModelWithProjection layout)
  kohya      `lora_te1_text_model_encoder_layers_N_self_attn_{q,k,v,out}_proj` (CLIP-L), `lora_te2_…` (bigG)

A layer's B A adds to `<layer>.weight`, except bigG's q/k/v: row block 0/1/2 of the fused
`….attn.in_proj_weight` (rows q|k|v, each width x width).
"""
import re

CLIP_L_LAYER = "conditioner.embedders.0.transformer.text_model.encoder.layers.{layer}.self_attn.{proj}_proj"
BIG_G_FUSED_LAYER = "conditioner.embedders.1.model.transformer.resblocks.{layer}.attn.in_proj_lora.{proj}_proj"
BIG_G_OUT_LAYER = "conditioner.embedders.1.model.transformer.resblocks.{layer}.attn.out_proj"
BIG_G_IN_PROJ_WEIGHT = "conditioner.embedders.1.model.transformer.resblocks.{layer}.attn.in_proj_weight"
FUSED_ROW_BLOCKS = ("q", "k", "v")
DIFFUSERS_LAYER = "{encoder}.text_model.encoder.layers.{layer}.self_attn.{proj}_proj"
KOHYA_LAYER = "lora_{encoder}_text_model_encoder_layers_{layer}_self_attn_{proj}_proj"
DIFFUSERS_ENCODERS = ("text_encoder", "text_encoder_2")
KOHYA_ENCODERS = ("te1", "te2")

_MINDBOOTH = [
    (0, re.compile(r"conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj")),
    (1, re.compile(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_lora\.(q|k|v)_proj")),
    (1, re.compile(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.attn\.(out)_proj")),
]
# transformers >= 5 saves CLIPTextModel without `text_model.`; diffusers reads both
_DIFFUSERS = re.compile(r"(text_encoder|text_encoder_2)\.(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj")
_KOHYA = re.compile(r"lora_(te1|te2|te)_text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj")


def is_text_encoder_layer(layer: str) -> bool:
    return layer.startswith("conditioner.")


def parse_mindbooth(layer: str):
    """MindBooth layer path -> (encoder 0|1, layer index, 'q'|'k'|'v'|'out'), or None if not a text-encoder LoRA layer."""
    for encoder, pattern in _MINDBOOTH:
        match = pattern.fullmatch(layer)
        if match:
            return encoder, int(match.group(1)), match.group(2)
    return None


def mindbooth_layer(encoder: int, layer: int, proj: str) -> str:
    if encoder == 0:
        return CLIP_L_LAYER.format(layer=layer, proj=proj)
    return (BIG_G_OUT_LAYER if proj == "out" else BIG_G_FUSED_LAYER).format(layer=layer, proj=proj)


def to_diffusers(layer: str) -> str:
    encoder, index, proj = _parsed(layer)
    return DIFFUSERS_LAYER.format(encoder=DIFFUSERS_ENCODERS[encoder], layer=index, proj=proj)


def to_kohya(layer: str) -> str:
    encoder, index, proj = _parsed(layer)
    return KOHYA_LAYER.format(encoder=KOHYA_ENCODERS[encoder], layer=index, proj=proj)


def peft_target(layer: str) -> str:
    """The layer's module name as peft matches it inside its text encoder (target_modules, rank/alpha patterns):
    without `text_model.`, which transformers >= 5 drops; as a name suffix it finds the module in either layout."""
    _, index, proj = _parsed(layer)
    return f"encoder.layers.{index}.self_attn.{proj}_proj"


def base_weight(layer: str):
    """(base weight name, row block) that the layer's B A adds to: bigG q/k/v -> (its in_proj_weight, 0/1/2),
    every other layer -> (`<layer>.weight`, None)."""
    encoder, index, proj = _parsed(layer)
    if encoder == 1 and proj != "out":
        return BIG_G_IN_PROJ_WEIGHT.format(layer=index), FUSED_ROW_BLOCKS.index(proj)
    return f"{layer}.weight", None


def from_diffusers(path: str):
    """diffusers/PEFT module path -> MindBooth layer path, or None if not a text-encoder projection."""
    match = _DIFFUSERS.fullmatch(path)
    if not match:
        return None
    return mindbooth_layer(DIFFUSERS_ENCODERS.index(match.group(1)), int(match.group(2)), match.group(3))


def from_kohya(module: str):
    """kohya module name -> MindBooth layer path, or None. `lora_te_` (SD1.x's single encoder) is CLIP-L."""
    match = _KOHYA.fullmatch(module)
    if not match:
        return None
    return mindbooth_layer(1 if match.group(1) == "te2" else 0, int(match.group(2)), match.group(3))


def _parsed(layer: str):
    parsed = parse_mindbooth(layer)
    if parsed is None:
        raise ValueError(f"'{layer}' is not a text-encoder LoRA layer (CLIP-L self_attn q/k/v/out_proj or bigG attn)")
    return parsed

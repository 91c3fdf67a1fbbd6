"""diffusers `AutoencoderKL` names <-> official SDXL VAE names (`first_stage_model.*`).

The level and block counts are read off the names, so the same rules serve SDXL's VAE and any
smaller one of the family. Two layout differences besides renaming:
- diffusers numbers decoder `up_blocks` from the lowest resolution, the official `up` list from the
  highest: up_blocks.i <-> up.(levels - 1 - i);
- attention q/k/v/out are Linear (C, C) in diffusers and 1x1 Conv2d (C, C, 1, 1) officially.
Values are passed through untouched apart from that reshape (numpy arrays, torch tensors, ...).
"""
import re

PREFIX = "first_stage_model."

# Per-layer renames, diffusers -> official. Older diffusers files name the attention layers
# query/key/value/proj_attn; they are read as well and always written in the current naming.
RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
LEGACY_ATTENTION = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
ATTENTION_READ = {**ATTENTION, **LEGACY_ATTENTION}
TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
MID_RESNETS = {"0": "block_1", "1": "block_2"}


TOP_BACK = {v: k for k, v in TOP.items()}
RESNET_BACK = {v: k for k, v in RESNET.items()}
ATTENTION_BACK = {v: k for k, v in ATTENTION.items()}
MID_RESNETS_BACK = {v: k for k, v in MID_RESNETS.items()}
# official names of the attention projections, whose weights are 1x1 convs officially
ATTENTION_PROJECTION_WEIGHT = re.compile(r".*\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight")


def _count_levels(names, pattern) -> int:
    found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    return 1 + max(found) if found else 0


def _layer(layer: str, table: dict, name: str) -> str:
    if layer not in table:
        raise KeyError(f"unknown VAE parameter '{name}' (layer '{layer}')")
    return table[layer]


def _diffusers_to_official(name: str, up_levels: int) -> str:
    layer, _, param = name.rpartition(".")
    if layer in ("quant_conv", "post_quant_conv"):
        return name
    part, _, rest = layer.partition(".")  # encoder / decoder
    if part not in ("encoder", "decoder"):
        raise KeyError(f"unknown VAE parameter '{name}'")
    if rest in TOP:
        return f"{part}.{TOP[rest]}.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.mid.{_layer(m.group(1), MID_RESNETS, name)}.{_layer(m.group(2), RESNET, name)}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{part}.mid.attn_1.{_layer(m.group(1), ATTENTION_READ, name)}.{param}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", rest):
        side, level, kind, index, sub = m.groups()
        level = int(level) if side == "down" else up_levels - 1 - int(level)
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{index}.{_layer(sub, RESNET, name)}.{param}"
        return f"{part}.{side}.{level}.attn.{index}.{_layer(sub, ATTENTION_READ, name)}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
        return f"{part}.down.{m.group(1)}.downsample.conv.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
        return f"{part}.up.{up_levels - 1 - int(m.group(1))}.upsample.conv.{param}"
    raise KeyError(f"unknown VAE parameter '{name}'")


def _official_to_diffusers(name: str, up_levels: int) -> str:
    layer, _, param = name.rpartition(".")
    if layer in ("quant_conv", "post_quant_conv"):
        return name
    part, _, rest = layer.partition(".")
    if part not in ("encoder", "decoder"):
        raise KeyError(f"unknown VAE parameter '{PREFIX}{name}'")
    if rest in TOP_BACK:
        return f"{part}.{TOP_BACK[rest]}.{param}"
    if m := re.fullmatch(r"mid\.(block_1|block_2)\.(.+)", rest):
        index = MID_RESNETS_BACK[m.group(1)]
        return f"{part}.mid_block.resnets.{index}.{_layer(m.group(2), RESNET_BACK, PREFIX + name)}.{param}"
    if m := re.fullmatch(r"mid\.attn_1\.(.+)", rest):
        return f"{part}.mid_block.attentions.0.{_layer(m.group(1), ATTENTION_BACK, PREFIX + name)}.{param}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest):
        side, level, kind, index, sub = m.groups()
        level = int(level) if side == "down" else up_levels - 1 - int(level)
        if kind == "block":
            return f"{part}.{side}_blocks.{level}.resnets.{index}.{_layer(sub, RESNET_BACK, PREFIX + name)}.{param}"
        return f"{part}.{side}_blocks.{level}.attentions.{index}.{_layer(sub, ATTENTION_BACK, PREFIX + name)}.{param}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv", rest):
        return f"{part}.down_blocks.{m.group(1)}.downsamplers.0.conv.{param}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv", rest):
        return f"{part}.up_blocks.{up_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{param}"
    raise KeyError(f"unknown VAE parameter '{PREFIX}{name}'")


def vae_to_official(state: dict) -> dict:
    """{diffusers VAE name: array} -> {`first_stage_model.*` name: array}."""
    up_levels = _count_levels(state, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for name, value in state.items():
        official = _diffusers_to_official(name, up_levels)
        if ATTENTION_PROJECTION_WEIGHT.fullmatch(official) and len(value.shape) == 2:
            value = value.reshape(tuple(value.shape) + (1, 1))
        out[PREFIX + official] = value
    return out


def vae_from_official(state: dict) -> dict:
    """{official name: array} -> {diffusers VAE name: array}. Only `first_stage_model.*` entries are read,
    so a whole SDXL checkpoint can be passed."""
    vae = {name[len(PREFIX):]: value for name, value in state.items() if name.startswith(PREFIX)}
    if not vae:
        raise ValueError(f"no '{PREFIX}*' parameters found: this is not an SDXL checkpoint with a VAE")
    up_levels = _count_levels(vae, r"decoder\.up\.(\d+)\.")
    out = {}
    for name, value in vae.items():
        if ATTENTION_PROJECTION_WEIGHT.fullmatch(name) and len(value.shape) == 4:
            value = value.reshape(tuple(value.shape[:2]))
        out[_official_to_diffusers(name, up_levels)] = value
    return out

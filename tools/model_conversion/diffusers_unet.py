"""diffusers `UNet2DConditionModel` names <-> official UNet names (`model.diffusion_model.*`): SDXL, SSD-1B, SD 1.x/2.x.

The block numbering is derived from the names themselves (resnets per level, which up levels have
attention), so the same rules serve SDXL base and any smaller UNet of the family."""
import re

PREFIX = "model.diffusion_model."

RESNET_DIFFUSERS_TO_OFFICIAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
RESNET_OFFICIAL_TO_DIFFUSERS = {v: k for k, v in RESNET_DIFFUSERS_TO_OFFICIAL.items()}

FIXED_DIFFUSERS_TO_OFFICIAL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
FIXED_OFFICIAL_TO_DIFFUSERS = {v: k for k, v in FIXED_DIFFUSERS_TO_OFFICIAL.items()}


def _resnet_part(rest: str, table: dict) -> str:
    layer, _, param = rest.rpartition(".")
    for source, target in table.items():
        if layer == source:
            return f"{target}.{param}"
    raise KeyError(f"unknown ResBlock parameter '{rest}'")


def _diffusers_layout(names):
    layers_per_block = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n)))
    up_with_attention = {int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))}
    return layers_per_block, up_with_attention


def unet_to_official(state: dict) -> dict:
    """{diffusers name: array} -> {official name: array}."""
    layers, up_with_attention = _diffusers_layout(state)
    out = {}
    for name, value in state.items():
        out[PREFIX + _diffusers_name_to_official(name, layers, up_with_attention)] = value
    return out


def _diffusers_name_to_official(name: str, layers: int, up_with_attention: set) -> str:
    layer, _, param = name.rpartition(".")
    if layer in FIXED_DIFFUSERS_TO_OFFICIAL:
        return f"{FIXED_DIFFUSERS_TO_OFFICIAL[layer]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = 1 + level * (layers + 1) + j
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_resnet_part(rest, RESNET_DIFFUSERS_TO_OFFICIAL)}"
        return f"input_blocks.{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m.group(1)) + 1) * (layers + 1)}.0.op.{m.group(2)}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_part(rest, RESNET_DIFFUSERS_TO_OFFICIAL)}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        block = level * (layers + 1) + j
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_resnet_part(rest, RESNET_DIFFUSERS_TO_OFFICIAL)}"
        return f"output_blocks.{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        level = int(m.group(1))
        position = 2 if level in up_with_attention else 1
        return f"output_blocks.{level * (layers + 1) + layers}.{position}.conv.{m.group(2)}"
    raise KeyError(f"unknown diffusers UNet parameter '{name}'")


def unet_from_official(state: dict) -> dict:
    """{official name: array} (with or without the `model.diffusion_model.` prefix) -> {diffusers name: array}."""
    stripped = {name[len(PREFIX):] if name.startswith(PREFIX) else name: value for name, value in state.items()}
    first_downsampler = min(
        (int(m.group(1)) for n in stripped if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", n))), default=None
    )
    if first_downsampler is None:  # one level only: every input block after conv_in is a resnet
        first_downsampler = 1 + max(int(m.group(1)) for n in stripped if (m := re.match(r"input_blocks\.(\d+)\.", n)))
    layers = first_downsampler - 1
    return {_official_name_to_diffusers(name, layers): value for name, value in stripped.items()}


def _official_name_to_diffusers(name: str, layers: int) -> str:
    layer, _, param = name.rpartition(".")
    if layer in FIXED_OFFICIAL_TO_DIFFUSERS:
        return f"{FIXED_OFFICIAL_TO_DIFFUSERS[layer]}.{param}"
    if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.+)", name):
        block, position, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(block - 1, layers + 1)
        if rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if position == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet_part(rest, RESNET_OFFICIAL_TO_DIFFUSERS)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    if m := re.match(r"middle_block\.(\d)\.(.+)", name):
        position, rest = int(m.group(1)), m.group(2)
        if position == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{position // 2}.{_resnet_part(rest, RESNET_OFFICIAL_TO_DIFFUSERS)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.+)", name):
        block, position, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = divmod(block, layers + 1)
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
        if position == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet_part(rest, RESNET_OFFICIAL_TO_DIFFUSERS)}"
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    raise KeyError(f"unknown official UNet parameter '{name}'")


def official_name_to_diffusers(name: str, layers_per_block: int) -> str:
    """One official name (the `model.diffusion_model.` prefix optional) -> its diffusers name, for a UNet with
    `layers_per_block` ResBlocks per level (SDXL: 2). Also maps module paths inside attention blocks
    (e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_q`): what follows the block passes through."""
    return _official_name_to_diffusers(name[len(PREFIX):] if name.startswith(PREFIX) else name, layers_per_block)


def diffusers_name_to_official(name: str, layers_per_block: int, up_with_attention=()) -> str:
    """One diffusers name -> its official name (without the prefix); the inverse of official_name_to_diffusers.
    `up_with_attention` (the up levels that have attention blocks) matters only for upsampler names."""
    return _diffusers_name_to_official(name, layers_per_block, set(up_with_attention))

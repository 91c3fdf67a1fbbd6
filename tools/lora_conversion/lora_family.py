"""Which model family a LoRA belongs to, and what that changes in its names.

The family (SD 1.x, SD 2.x, SDXL, SSD-1B; `tools.model_conversion.file_layout.FAMILIES`; and DeepFloyd IF) comes from
the model config (`--config`). It decides:
  - the UNet block numbering (`layers_per_block`, the config's num_res_blocks) between diffusers and sgm names;
    per-block transformer depths (SSD-1B) need nothing more, the depth index is in every name;
  - the text encoders (text_encoder_names.TextEncoder): SD 1.x one CLIP ViT-L, SD 2.x one OpenCLIP ViT-H (fused
    in_proj in MindBooth, separate q/k/v_proj elsewhere), SDXL/SSD-1B CLIP ViT-L + OpenCLIP bigG;
  - kohya's names and header: sd-scripts names SD 1.x/2.x UNet modules by diffusers' layout
    (`lora_unet_down_blocks_0_attentions_0_…`) and SDXL's by sgm's (`lora_unet_input_blocks_4_1_…`), and writes
    `ss_base_model_version` sd_v1 / sd_v2 / sd_v2_v / sdxl_base_v1-0.
DeepFloyd IF's UNet keeps diffusers' names in MindBooth (`model.diffusion_model.down_blocks.1.attentions.0.add_k_proj`),
so its LoRA layers are those paths as they are, in every format; IF has no kohya names (no webui runs IF) and no
text-encoder LoRA here. An IF LoRA is also told by its names (`is_if_layer`) when no --config is given.
`check_family` refuses a LoRA whose layer names show another family than the config's.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from mindbooth.tensor_dtypes import ConversionError
from tools.lora_conversion import text_encoder_names as te
from tools.model_conversion.file_layout import FAMILIES, SD1, SD2, SDXL, SSD1B

SDXL_LAYERS_PER_BLOCK = 2
IF = "DeepFloyd IF"
# every family a LoRA can be of -> the config to pass for it
LORA_FAMILIES = {**FAMILIES, IF: "configs/inference/if_i_xl.yaml"}
# an IF UNet LoRA layer: a projection of an added-key/value attention cell, by its diffusers path
IF_LAYER = re.compile(r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+"
                      r"\.(?:to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)")
IF_HUB_NAMES = {1: "DeepFloyd/IF-I-XL-v1.0", 2: "DeepFloyd/IF-II-L-v1.0"}


@dataclass(frozen=True)
class LoraFamily:
    name: str  # one of LORA_FAMILIES
    layers_per_block: int = SDXL_LAYERS_PER_BLOCK
    text_encoders: tuple = te.SDXL_ENCODERS
    kohya_sgm_unet: bool = True  # kohya UNet names in sgm's layout (SDXL) or diffusers' (SD 1.x/2.x)
    v_parameterization: bool = False
    if_stage: int = 0  # DeepFloyd IF: 1 (text -> 64 px) or 2 (super-resolution)

    @property
    def is_if(self) -> bool:
        return self.name == IF

    @property
    def v2(self) -> bool:
        return self.name == SD2

    @property
    def base_model(self) -> str:
        """The released model's Hub name, the default `base_model` written into an exported file's header."""
        if self.is_if:
            return IF_HUB_NAMES[self.if_stage]
        if self.name == SD2:
            return "stabilityai/stable-diffusion-2-1" + ("" if self.v_parameterization else "-base")
        return {SD1: "stable-diffusion-v1-5/stable-diffusion-v1-5", SSD1B: "segmind/SSD-1B"}.get(
            self.name, "stabilityai/stable-diffusion-xl-base-1.0")

    @property
    def kohya_version(self) -> str:
        """sd-scripts' ss_base_model_version (model_util.get_model_version_str_for_sd1_sd2, sdxl_model_util)."""
        if self.name in (SDXL, SSD1B):
            return "sdxl_base_v1-0"
        return ("sd_v2" if self.v2 else "sd_v1") + ("_v" if self.v_parameterization else "")


SDXL_FAMILY = LoraFamily(SDXL)  # without --config


def if_family(stage: int = 1) -> LoraFamily:
    """DeepFloyd IF stage `stage`: diffusers' UNet names throughout, no text-encoder LoRA, no kohya names."""
    return LoraFamily(IF, text_encoders=(), kohya_sgm_unet=False, if_stage=stage)


def is_if_layer(layer: str) -> bool:
    return IF_LAYER.fullmatch(layer) is not None


def family_of_layers(layers, config_family: LoraFamily, config) -> LoraFamily:
    """The family to name `layers` by: the config's, or without --config (`config` None) IF stage I when every
    layer is an IF one (the SDXL default otherwise)."""
    if config is None and layers and all(is_if_layer(name) for name in layers):
        return if_family(1)
    return config_family


def family(name: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK, v_parameterization: bool = False) -> LoraFamily:
    """The LoraFamily of a file_layout family name."""
    encoders = {SD1: te.SD1_ENCODERS, SD2: te.SD2_ENCODERS}.get(name, te.SDXL_ENCODERS)
    return LoraFamily(name, layers_per_block, encoders, name in (SDXL, SSD1B), v_parameterization)


def family_from_config(config) -> LoraFamily:
    """The family of the model `config` builds (SDXL base when `config` is None); a one-line error for a config
    that is missing or not one of the four families."""
    if config is None:
        return SDXL_FAMILY
    from tools.model_conversion.file_layout import config_family
    from tools.model_conversion.sdxl_layout import load_config

    if not Path(config).is_file():
        raise ConversionError(f"model config not found: {config}")
    try:
        loaded = load_config(config)
    except (FileNotFoundError, ValueError) as error:  # a missing base, a cycle of bases
        raise ConversionError(str(error)) from None
    from tools.model_conversion.if_layout import if_config

    deepfloyd = if_config(config)
    if deepfloyd is not None:
        return if_family(deepfloyd.stage)
    try:
        params = loaded["model"]["params"]
        layers = int(params["network_config"]["params"]["num_res_blocks"])
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{config} has no model.params.network_config.params.num_res_blocks "
                              f"(one number: ResBlocks per UNet level)") from None
    name = config_family(config)
    if name not in FAMILIES:
        raise ConversionError(f"{config} builds {name or 'a model the layout rules do not describe'}; LoRA "
                              f"conversion knows {', '.join(LORA_FAMILIES)}")
    scaling = str(params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", ""))
    return family(name, layers, scaling.endswith("VScaling"))


def family_from_base(names) -> LoraFamily:
    """The family of a MindBooth base checkpoint from its parameter names (its text encoders, SSD-1B's middle block
    without attention); SDXL's when the names do not tell (a UNet-only file)."""
    names = list(names)
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    if has("model.diffusion_model.down_blocks."):  # diffusers' UNet names: IF (stage II's UNet takes class_labels)
        return if_family(2 if has("model.diffusion_model.class_embedding.") else 1)
    if has("conditioner.embedders.1.model."):
        return family(SDXL if has("model.diffusion_model.middle_block.1.") else SSD1B)
    if has("conditioner.embedders.0.model."):
        return family(SD2)
    if has("conditioner.embedders.0.transformer."):
        return family(SD1)
    return SDXL_FAMILY


# ---------------------------------------------------------------- what the layer names show

_INPUT = re.compile(r"input_blocks\.(\d+)\.1\.")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.1\.")
_DEEPER_BLOCK = re.compile(r"\.transformer_blocks\.([1-9]\d*)\.")
_SD, _XL = {SD1, SD2}, {SDXL, SSD1B}


def families_shown(layers, layers_per_block: int = SDXL_LAYERS_PER_BLOCK):
    """({families the layer names allow}, what showed it) from telltales: SD 1.x/2.x have attention at the first
    UNet level and one transformer per block; SDXL/SSD-1B none at the first level, attention in the deepest up level,
    deeper transformers; SSD-1B no middle-block attention; the text encoders' kind and place; IF its diffusers
    names (`…attentions.N.add_k_proj`); every other UNet name is sgm's, an SD family's."""
    allowed, shown = set(LORA_FAMILIES), []
    sgm_example = None

    def narrow(families, why):
        nonlocal allowed
        if not families >= allowed:
            allowed &= families
            if why:
                shown.append(why)

    for name in layers:
        if is_if_layer(name):
            narrow({IF}, f"DeepFloyd IF attention names ({name})")
            continue
        if te.is_text_encoder_layer(name):
            embedder, fused, _, _ = te.parse_mindbooth(name)
            if embedder == 1:
                narrow(_XL, f"text-encoder LoRA on a second encoder ({name})")
            elif fused:
                narrow({SD2}, f"text-encoder LoRA on OpenCLIP as the only encoder ({name})")
            else:
                narrow({SD1, SDXL, SSD1B}, f"text-encoder LoRA on CLIP ViT-L ({name})")
            continue
        sgm_example = sgm_example or name  # an SD family's UNet layer: said only when nothing else shows the family
        narrow(set(FAMILIES), None)
        if (m := _INPUT.match(name)) and (int(m.group(1)) - 1) // (layers_per_block + 1) == 0:
            narrow(_SD, f"attention at the first UNet level ({name})")
        if (m := _OUTPUT.match(name)) and int(m.group(1)) // (layers_per_block + 1) == 0:
            narrow(_XL, f"attention in the deepest up level ({name})")
        if (m := _OUTPUT.match(name)) and int(m.group(1)) // (layers_per_block + 1) >= 3:
            narrow(_SD, f"attention in a fourth up level ({name})")
        if _DEEPER_BLOCK.search(name):
            narrow(_XL, f"more than one transformer per block ({name})")
        if name.startswith("middle_block.1."):
            narrow({SD1, SD2, SDXL}, f"middle-block attention ({name})")
    if IF not in allowed and not shown and sgm_example:
        shown.append(f"UNet names in the sgm layout ({sgm_example})")
    return allowed, shown


def check_family(layers, lora_family: LoraFamily, source: str, config) -> None:
    """A one-line error if the LoRA's names show another family than `lora_family` (that of `config`)."""
    allowed, shown = families_shown(layers, lora_family.layers_per_block)
    if lora_family.name in allowed:
        return
    found = " or ".join(f for f in LORA_FAMILIES if f in allowed) or "no single family"
    hint = f"pass --config {LORA_FAMILIES[next(f for f in LORA_FAMILIES if f in allowed)]}" if allowed else \
        "is it one LoRA file?"
    raise ConversionError(f"{source} looks like a LoRA for {found} ({'; '.join(shown)}), not for "
                          f"{lora_family.name} ({config}): {hint}")

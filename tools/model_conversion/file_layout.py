"""Official single-file checkpoints as released, against the sgm names MindBooth's models use.

- Names: SDXL and SSD-1B files use the model's names. SD 1.x/2.x files (CompVis/Stability LDM) keep their one text
  encoder under `cond_stage_model.`: `cond_stage_model.transformer.` (CLIP ViT-L, SD 1.x) and
  `cond_stage_model.model.` (OpenCLIP ViT-H, SD 2.x) are the model's `conditioner.embedders.0.transformer.` and
  `conditioner.embedders.0.model.`.
- Tensors a file holds that no model parameter takes (`unused`): an EMA copy of the UNet, the DDPM schedule buffers,
  CLIP's position_ids, and in SD 2.x the parts of the OpenCLIP tower SD 2.x does not use. They are skipped with one
  note; anything else unexpected stays an error.
- `detect(shapes)` names what a file is (one of `FAMILIES`, or what kind of wrong input), from telltale keys.
"""
import re

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
FILE_TO_MODEL_PREFIX = {SD1_TEXT: "conditioner.embedders.0.transformer.", SD2_TEXT: "conditioner.embedders.0.model."}

SD1, SD2, SDXL, SSD1B = "Stable Diffusion 1.x", "Stable Diffusion 2.x", "SDXL base 1.0", "SSD-1B"
# family -> the config to pass for it
FAMILIES = {
    SD1: "configs/inference/sd_v1.5.yaml",
    # v (768) and base (512) have the same weights layout: the keys cannot tell them apart
    SD2: "configs/inference/sd_v2.1.yaml (768-v) or configs/inference/sd_v2.1_base.yaml (512)",
    SDXL: "configs/inference/sd_xl_base.yaml",
    SSD1B: "configs/inference/ssd_1b.yaml",
}

# LatentDiffusion's noise-schedule buffers (ldm/models/diffusion/ddpm.py): the model recomputes them from its config
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod")
_SD2_LAST_BLOCK = re.compile(re.escape(SD2_TEXT) + r"transformer\.resblocks\.(\d+)\.")


# ---------------------------------------------------------------- names
def model_name(file_name: str) -> str:
    """A file's name -> the model's (sgm) name."""
    for file_prefix, model_prefix in FILE_TO_MODEL_PREFIX.items():
        if file_name.startswith(file_prefix):
            return model_prefix + file_name[len(file_prefix):]
    return file_name


def file_names(model_names) -> dict:
    """{model name: file name} for a model's whole name set: a model with a single text encoder and no label
    embedding (SD 1.x/2.x) gets the LDM file names, any other keeps its names."""
    model_names = list(model_names)
    single_text = not any(n.startswith("conditioner.embedders.1.") or ".label_emb." in n for n in model_names)
    if not single_text:
        return {n: n for n in model_names}
    back = {model_prefix: file_prefix for file_prefix, model_prefix in FILE_TO_MODEL_PREFIX.items()}
    out = {}
    for name in model_names:
        prefix = next((p for p in back if name.startswith(p)), None)
        out[name] = back[prefix] + name[len(prefix):] if prefix else name
    return out


# ---------------------------------------------------------------- tensors no model parameter takes
def _unused_reasons(names) -> dict:
    """{name: why unused} for the names of a file that no model parameter takes."""
    names = list(names)
    reasons = {}
    # A file with text_projection holds the whole OpenCLIP ViT-H tower as open_clip saved it; SD 2.x conditions on
    # its penultimate layer, so the model is built without the last block (as diffusers' SD 2 text encoder).
    whole_tower = SD2_TEXT + "text_projection" in names
    last = max((int(m.group(1)) for n in names if (m := _SD2_LAST_BLOCK.match(n))), default=None)
    for name in names:
        if name.startswith("model_ema."):
            reasons[name] = "model_ema.* (the EMA copy of the UNet)"
        elif "." not in name and (name in DDPM_BUFFERS or name.startswith("posterior_")):
            reasons[name] = "DDPM schedule buffers (the model computes them from its config)"
        elif name.endswith(".position_ids"):
            reasons[name] = "position_ids (CLIP's 0..76 index buffer)"
        elif name in (SD2_TEXT + "text_projection", SD2_TEXT + "logit_scale") or (
                whole_tower and (m := _SD2_LAST_BLOCK.match(name)) and int(m.group(1)) == last):
            reasons[name] = ("of the OpenCLIP tower SD 2.x does not use (its last block: SD 2.x takes the "
                             "penultimate layer; text_projection; logit_scale)")
    return reasons


def select(shapes: dict):
    """{file name: shape} -> ({name: shape} of the tensors a model takes, one note line on what was skipped or '')."""
    reasons = _unused_reasons(shapes)
    kept = {n: s for n, s in shapes.items() if n not in reasons}
    counts = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return kept, ""
    return kept, (f"skipped {len(reasons)} tensors no model parameter takes: "
                  + "; ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda c: -c[1])))


# ---------------------------------------------------------------- what is this file?
def _has(names, *parts):
    return any(all(part in n for part in parts) for n in names)


def detect(shapes: dict) -> str:
    """Name the kind of checkpoint a {file name: shape} key set is: one of FAMILIES, or what else it is."""
    names = list(shapes)
    if not names:
        return "an empty file (no tensors)"
    if _has(names, "lora_") or _has(names, "lora.") or _has(names, ".alpha"):
        return "a LoRA file, not a full model"
    if _has(names, ".gamma") or _has(names, ".beta") or _has(names, "embedding_table"):
        return "a file with MindSpore parameter names (gamma/beta/embedding_table), not the official layout"
    if _has(names, "down_blocks.", "resnets.") and not _has(names, UNET):
        return "a diffusers-format component (pass the diffusers model folder instead)"
    xl_g = "conditioner.embedders.1.model."
    if "conditioner.embedders.0.model.token_embedding.weight" in shapes and not _has(names, "conditioner.embedders.1."):
        return "the SDXL refiner (OpenCLIP bigG is embedder 0, no CLIP ViT-L)"
    if xl_g + "text_projection.weight" in shapes and xl_g + "logit_scale" not in shapes:
        return "an SDXL LCM-layout checkpoint (text_projection.weight, no logit_scale)"
    first = shapes.get(UNET + "input_blocks.0.0.weight")
    if first is not None and len(first) == 4 and first[1] == 9:
        return f"an {'SDXL ' if _has(names, xl_g) else ''}inpainting model (9 UNet input channels)"
    if first is not None and len(first) == 4 and first[1] != 4:
        return f"a UNet with {first[1]} input channels (the supported models have 4)"
    if _has(names, SD1_TEXT):
        family, text = SD1, "CLIP ViT-L"
    elif _has(names, SD2_TEXT):
        family, text = SD2, "OpenCLIP ViT-H"
    elif _has(names, "conditioner.embedders.0.transformer.") and _has(names, xl_g):
        # SSD-1B is SDXL distilled: the same layout, but its middle block is one ResBlock (no transformer)
        family = SSD1B if _has(names, UNET) and not _has(names, UNET + "middle_block.1.") else SDXL
        text = "CLIP ViT-L and OpenCLIP bigG"
    else:
        family, text = None, None
    present = ((_has(names, UNET), "UNet"), (text is not None, text), (_has(names, VAE), "VAE"))
    parts = [what for there, what in present if there]
    if family and len(parts) == 3:
        return family
    if family:
        return f"a partial {family} checkpoint (only {', '.join(parts)})"
    if _has(names, "encoder.conv_in") and not parts:
        return "a standalone VAE"
    if parts:
        return "a partial checkpoint (only " + ", ".join(parts) + ")"
    return "an unknown model (no SDXL, SSD-1B, SD 1.x or SD 2.x telltale keys)"


def official_file_shapes(model_params) -> dict:
    """{official file name: shape} of the released single file of a config's model (`sdxl_layout.official_shapes`
    in the family's file names)."""
    from tools.model_conversion.sdxl_layout import official_shapes

    shapes = official_shapes(model_params)
    names = file_names(shapes)
    return {names[n]: s for n, s in shapes.items()}


def model_family(model_shapes: dict) -> str:
    """What `detect` calls a model given its {sgm name: shape} (MindSpore names mapped back first by the caller)."""
    names = file_names(model_shapes)
    return detect({names[n]: s for n, s in model_shapes.items()})


def config_family(config_path):
    """The family of the model a config builds, by the rules (no MindSpore), or None where the rules do not
    describe the config."""
    from tools.model_conversion.sdxl_layout import load_config

    try:
        return detect(official_file_shapes(load_config(config_path)["model"]["params"]))
    except (KeyError, TypeError, ValueError, NotImplementedError, AttributeError):
        return None

"""Text-encoder weights: transformers (diffusers' `text_encoder`, `text_encoder_2`) <-> official (sgm) names.

All functions map {name: numpy array} -> {name: numpy array}.
- CLIP ViT-L (SD 1.x, SDXL): transformers `text_model.X` <-> `conditioner.embedders.0.transformer.text_model.X`.
- OpenCLIP (SDXL's bigG under `conditioner.embedders.1.model.`, SD 2.x's ViT-H under
  `conditioner.embedders.0.model.`: the `prefix` argument): transformers CLIPTextModel[WithProjection] <-> open_clip
  names; q/k/v projections are fused into `in_proj_*` (rows q, k, v), `text_projection.weight` (out, in) is
  stored transposed as `text_projection` (in, out), and with it `logit_scale` (CLIP's temperature, not part of
  a text model) is added/dropped. SD 2.x's text encoder has no projection: neither is written.
The `*_from_official` functions read only the names under their own prefix, so a whole SDXL
checkpoint may be passed, and return the names of diffusers' files (`text_model.…`).
transformers' `position_ids` buffers are skipped.
"""
import re

import numpy as np

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
LOGIT_SCALE = np.log(1 / 0.07)  # open_clip's initial value; any value works, text encoding ignores it

# transformers -> open_clip, within one encoder layer
_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TOP_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OC_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("q", "k", "v")
_CLIP_L_BARE = ("embeddings.", "encoder.", "final_layer_norm.")


def _skip(name: str) -> bool:
    return name.endswith("position_ids")


def _prefixed(name: str) -> str:
    """transformers >= 5 names a CLIPTextModel's parameters without `text_model.` (in memory and in the files it
    saves: `embeddings.…`, `encoder.…`, `final_layer_norm.…`); older files have the prefix. Both read the same."""
    return "text_model." + name if name.startswith(_CLIP_L_BARE) else name


def clip_l_to_official(state: dict) -> dict:
    out = {}
    for name, value in state.items():
        if _skip(name):
            continue
        name = _prefixed(name)
        if not name.startswith("text_model."):
            raise KeyError(f"'{name}' is not a CLIP-L text model name (expected transformers' CLIPTextModel names, "
                           "'text_model.…')")
        out[CLIP_L_PREFIX + name] = value
    return out


def clip_l_from_official(state: dict) -> dict:
    out = {}
    for name, value in state.items():
        if not name.startswith(CLIP_L_PREFIX) or _skip(name):
            continue
        if not name.startswith(CLIP_L_PREFIX + "text_model."):
            raise KeyError(f"'{name}' is not a CLIP-L text model name")
        out[name[len(CLIP_L_PREFIX):]] = value
    return out


def open_clip_official_name(name: str) -> str:
    """transformers name -> open_clip name (without prefix); q/k/v projections give their fused name."""
    name = _prefixed(name)
    if name in _TOP_RENAMES:
        return _TOP_RENAMES[name]
    if name == "text_projection.weight":
        return "text_projection"
    match = _HF_LAYER.fullmatch(name)
    if match:
        layer, module, kind = match.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"transformer.resblocks.{layer}.attn.in_proj_{kind}"
        if module in _LAYER_RENAMES:
            return f"transformer.resblocks.{layer}.{_LAYER_RENAMES[module]}.{kind}"
    raise KeyError(f"'{name}' is not an OpenCLIP-bigG/ViT-H text model name "
                   "(expected transformers' CLIPTextModel names)")


def open_clip_to_official(state: dict, prefix=OPEN_CLIP_PREFIX) -> dict:
    out, fused = {}, {}
    for name, value in state.items():
        if _skip(name):
            continue
        target = prefix + open_clip_official_name(name)
        if target.endswith(("in_proj_weight", "in_proj_bias")):
            which = name.split("self_attn.")[1][0]  # 'q', 'k' or 'v'
            fused.setdefault(target, {})[which] = value
        elif name == "text_projection.weight":
            out[target] = np.asarray(value).T
        else:
            out[target] = value
    for target, parts in fused.items():
        if set(parts) != set(_QKV):
            raise KeyError(f"'{target}' needs q, k and v projections; got only {sorted(parts)}")
        out[target] = np.concatenate([np.asarray(parts[p]) for p in _QKV], axis=0)
    if "text_projection.weight" in state:
        # the model's dtype, read from metadata only (values may be lazily loaded arrays)
        dtype = next((v.dtype for v in out.values() if hasattr(v, "dtype")), np.float32)
        out[prefix + "logit_scale"] = np.array(LOGIT_SCALE, dtype=dtype)
    return out


def open_clip_from_official(state: dict, prefix=OPEN_CLIP_PREFIX) -> dict:
    reverse_top = {v: k for k, v in _TOP_RENAMES.items()}
    reverse_layer = {v: k for k, v in _LAYER_RENAMES.items()}
    out = {}
    for full_name, value in state.items():
        if not full_name.startswith(prefix):
            continue
        name = full_name[len(prefix):]
        if name == "logit_scale":
            continue
        if name in reverse_top:
            out[reverse_top[name]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = np.asarray(value).T
        elif (match := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", name)):
            layer, kind = match.groups()
            for p, part in zip(_QKV, np.split(np.asarray(value), 3, axis=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] = part
        elif (match := _OC_LAYER.fullmatch(name)) and match.group(2) in reverse_layer:
            layer, module, kind = match.groups()
            out[f"text_model.encoder.layers.{layer}.{reverse_layer[module]}.{kind}"] = value
        else:
            raise KeyError(f"'{full_name}' is not an OpenCLIP-bigG/ViT-H text model name")
    return out

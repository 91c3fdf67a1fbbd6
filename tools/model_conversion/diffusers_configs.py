"""The config files of a diffusers pipeline folder, derived from a MindBooth inference YAML (`model.params`).

Each function returns the dict diffusers/transformers write as `config.json` (`scheduler_config.json`,
`model_index.json`) for one component, from the same numbers the MindBooth model is built from: UNet channels,
depths, heads, context width; VAE channels; text-encoder widths; the DDPM betas and the prediction type. A config
that diffusers' classes cannot express (e.g. attention on only some blocks of a level) is refused with one line.

The scheduler is `EulerDiscreteScheduler` on the config's discretization (scaled_linear betas = LegacyDDPM's
sqrt-linear ones): the diffusers counterpart of MindBooth's Euler sampler.
"""
from mindbooth.tensor_dtypes import ConversionError
from tools.model_conversion.file_layout import SD1, SD2, SDXL, SSD1B
from tools.model_conversion.sdxl_layout import _level_depths

DIFFUSERS_VERSION = "0.30.0"  # the layout written is that of diffusers 0.30 and later (read by every later version)
TRANSFORMERS_VERSION = "4.44.0"
# pixel size the family was trained at (the pipelines' default height/width)
IMAGE_SIZE = {SD1: 512, SDXL: 1024, SSD1B: 1024}
SD2_IMAGE_SIZE = {"v_prediction": 768, "epsilon": 512}
PIPELINE = {SD1: "StableDiffusionPipeline", SD2: "StableDiffusionPipeline", SDXL: "StableDiffusionXLPipeline",
            SSD1B: "StableDiffusionXLPipeline"}
# the text-encoder classes' own defaults (gm/modules/embedders/modules.py), for a YAML that leaves a number out
TEXT_DEFAULTS = {
    "FrozenCLIPEmbedder": dict(width=768, layers=12, heads=12, mlp_width=3072, act="quick_gelu"),
    "FrozenOpenCLIPEmbedder": dict(width=1024, layers=23, heads=16, mlp_width=4096, act="gelu"),
    "FrozenOpenCLIPEmbedder2": dict(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu"),
}
PREDICTION = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}


def _kind(node) -> str:
    return node["target"].rsplit(".", 1)[-1]


def _uniform(values):
    """One value when all are equal (as diffusers' released configs write it), else the list."""
    values = list(values)
    return values[0] if all(v == values[0] for v in values) else values


def prediction_type(model_params) -> str:
    scaling = _kind(model_params["denoiser_config"]["params"]["scaling_config"])
    if scaling not in PREDICTION:
        raise ConversionError(f"the denoiser's {scaling} has no diffusers prediction_type (EpsScaling, VScaling have)")
    return PREDICTION[scaling]


def image_size(model_params, family) -> int:
    return SD2_IMAGE_SIZE[prediction_type(model_params)] if family == SD2 else IMAGE_SIZE[family]


def unet_config(model_params, family) -> dict:
    """`UNet2DConditionModel` config of the YAML's `network_config` (sgm UNetModel)."""
    p = model_params["network_config"]["params"]
    mc, mult, nres = p["model_channels"], list(p["channel_mult"]), p["num_res_blocks"]
    if not isinstance(nres, int):
        raise ConversionError("num_res_blocks per level has no diffusers UNet2DConditionModel equivalent")
    levels = len(mult)
    depth = p.get("transformer_depth", 1)
    depth_in = _level_depths(depth, levels, nres, "transformer_depth")
    depth_out = _level_depths(p.get("transformer_depth_output", depth), levels, nres + 1, "transformer_depth_output")
    middle = p.get("transformer_depth_middle")
    middle = depth_in[-1][-1] if middle is None else middle
    attention = []
    for level in range(levels):
        blocks = depth_in[level] + depth_out[level] if 2 ** level in p["attention_resolutions"] else [0]
        if any(blocks) and not all(blocks):
            raise ConversionError(f"UNet level {level} has attention on some blocks only: diffusers' blocks have it "
                                  "on all or none")
        attention.append(bool(any(blocks)))
    # diffusers counts transformer layers per down level (int or one per block) and per up level (reversed);
    # a level without attention ignores its entry, except the last, whose entry is also the middle block's depth
    down = [_uniform(depth_in[level]) if attention[level] else 1 for level in range(levels)]
    up = [_uniform(depth_out[level]) if attention[level] else 1 for level in reversed(range(levels))]
    if not attention[-1]:
        down[-1] = middle or 1
    if middle and down[-1] != middle:
        raise ConversionError(f"the middle block's transformer depth {middle} differs from the last level's "
                              f"{down[-1]}: diffusers' UNet2DConditionModel gives both one number")
    channels = [mc * m for m in mult]
    head_channels = p.get("num_head_channels", 64)
    heads = [p["num_heads"] if head_channels == -1 else ch // head_channels for ch in channels]
    config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": image_size(model_params, family) // model_params.get("latents_per_pixel", 8),
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if middle else "UNetMidBlock2D",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": nres,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-05,
        "cross_attention_dim": p["context_dim"],
        "transformer_layers_per_block": _uniform(down),
        "attention_head_dim": _uniform(heads),  # diffusers' legacy name for the number of heads
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        # attention scores in fp32 under fp16 weights, as stabilityai/stable-diffusion-2-1 (768-v) ships: the v model
        # overflows without it in fp16; fp32 results are the same either way
        "upcast_attention": family == SD2 and prediction_type(model_params) == "v_prediction",
        "dual_cross_attention": False,
        "class_embed_type": None,
        "addition_embed_type": None,
    }
    if up != list(reversed(down)):  # an asymmetric UNet (SSD-1B): the up levels' depths are given apart
        config["reverse_transformer_layers_per_block"] = up
    if p.get("num_classes") == "sequential":  # SDXL's size/crop conditioning on the pooled text embedding
        outdims = {e.get("params", {}).get("outdim") for e in _embedders(model_params)
                   if _kind(e) == "ConcatTimestepEmbedderND"}
        if len(outdims) != 1:
            raise ConversionError(f"the size/crop embedders have widths {sorted(outdims)}: diffusers takes one")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=outdims.pop(),
                      projection_class_embeddings_input_dim=p["adm_in_channels"])
    elif p.get("num_classes") is not None:
        raise ConversionError(f"UNet num_classes {p['num_classes']!r} has no diffusers export")
    return config


def vae_config(model_params, family) -> dict:
    """`AutoencoderKL` config of the YAML's `first_stage_config`."""
    p = model_params["first_stage_config"]["params"]
    dd = p["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ConversionError("a VAE with attention inside its levels has no diffusers AutoencoderKL equivalent")
    if not dd.get("double_z", True) or p.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise ConversionError("diffusers' AutoencoderKL needs double_z and embed_dim == z_channels")
    levels = len(dd["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": dd["z_channels"],
        "norm_num_groups": 32,
        "sample_size": image_size(model_params, family),
        "scaling_factor": model_params["scale_factor"],
        "force_upcast": True,
    }


def _embedders(model_params) -> list:
    return model_params["conditioner_config"]["params"]["emb_models"]


def text_encoders(model_params) -> list:
    """[(embedder index, kind, its params with the class defaults filled in)] of the text embedders, in order."""
    out = []
    for index, embedder in enumerate(_embedders(model_params)):
        kind = _kind(embedder)
        if kind in TEXT_DEFAULTS:
            out.append((index, kind, {**TEXT_DEFAULTS[kind], **embedder.get("params", {})}))
    return out


def text_encoder_config(kind, p) -> dict:
    """transformers `CLIPTextConfig` (CLIPTextModel, or CLIPTextModelWithProjection where the tower projects)."""
    projection = p.get("projection_dim")
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": p.get("vocab_size", 49408),
        "max_position_embeddings": p.get("max_length", 77),
        "hidden_size": p["width"],
        "intermediate_size": p["mlp_width"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "hidden_act": p["act"],
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        # the released SD configs' ids: eos_token_id 2 makes transformers pool at the highest id (end-of-text)
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
    }
    if projection:
        config["projection_dim"] = projection
    return config


def text_encoder_class(kind, p) -> str:
    return "CLIPTextModelWithProjection" if p.get("projection_dim") else "CLIPTextModel"


def scheduler_config(model_params) -> dict:
    """`EulerDiscreteScheduler` on the denoiser's discretization (LegacyDDPMDiscretization's numbers)."""
    discretization = model_params["denoiser_config"]["params"]["discretization_config"]
    if _kind(discretization) != "LegacyDDPMDiscretization":
        raise ConversionError(f"the denoiser's {_kind(discretization)} has no diffusers scheduler equivalent")
    d = discretization.get("params", {})
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.get("num_timesteps", 1000),
        "beta_start": d.get("linear_start", 0.00085),
        "beta_end": d.get("linear_end", 0.012),
        "beta_schedule": "scaled_linear",  # linspace(sqrt(start), sqrt(end))**2: LegacyDDPM's betas
        "trained_betas": None,
        "prediction_type": prediction_type(model_params),
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def model_index(family, text_classes: list) -> dict:
    """`model_index.json`: the pipeline class and each component's library and class."""
    index = {
        "_class_name": PIPELINE[family],
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", text_classes[0]],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if PIPELINE[family] == "StableDiffusionXLPipeline":
        index.update(text_encoder_2=["transformers", text_classes[1]], tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
    else:  # no safety checker: the folder holds the fine-tuned model only
        index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                     requires_safety_checker=False)
    return index

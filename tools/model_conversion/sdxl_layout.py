"""What a checkpoint of a supported model (SDXL base, SSD-1B, SD 1.x, SD 2.x) in the official sgm layout contains.

`official_shapes(model_params)` derives every official parameter name and shape from the
architecture numbers of a model config (the `model.params` of `configs/inference/*.yaml`),
by the same rules Stability's sgm code uses to build the model. For `sd_xl_base.yaml` it gives the
2514 entries of `sd_xl_base_1.0.safetensors`; for a tiny config, the same names with small shapes.
The names are those the MindSpore model uses (its text encoders under `conditioner.embedders.N`); SD 1.x/2.x
files name their text encoder `cond_stage_model.*`, which `file_layout` maps.

`model_mindspore_shapes(config)` reads the names and shapes from the MindSpore model itself
(built without allocating weights): the set the converted checkpoint must load into.

`rule_mindspore_shapes(config)` is that set derived by the rules, in MindSpore names, without MindSpore: for a
config built of the shipped configs' modules (`RULE_MODULES`), where the tests hold it equal to the model's (every
shipped config); None for any other config.
"""
from collections import OrderedDict

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model."
CLIP_G = "conditioner.embedders.1.model."
VAE = "first_stage_model."

CLIP_VOCAB = 49408
CLIP_CONTEXT = 77


# ---------------------------------------------------------------- rule-derived official layout
def _linear(out, prefix, n_out, n_in, bias=True):
    out[prefix + ".weight"] = (n_out, n_in)
    if bias:
        out[prefix + ".bias"] = (n_out,)


def _conv(out, prefix, n_out, n_in, k):
    out[prefix + ".weight"] = (n_out, n_in, k, k)
    out[prefix + ".bias"] = (n_out,)


def _norm(out, prefix, n):
    out[prefix + ".weight"] = (n,)
    out[prefix + ".bias"] = (n,)


def _unet_resblock(out, p, ch_in, ch_out, emb):
    _norm(out, p + ".in_layers.0", ch_in)
    _conv(out, p + ".in_layers.2", ch_out, ch_in, 3)
    _linear(out, p + ".emb_layers.1", ch_out, emb)
    _norm(out, p + ".out_layers.0", ch_out)
    _conv(out, p + ".out_layers.3", ch_out, ch_out, 3)
    if ch_in != ch_out:
        _conv(out, p + ".skip_connection", ch_out, ch_in, 1)


def _unet_transformer(out, p, ch, depth, context_dim, linear):
    _norm(out, p + ".norm", ch)
    _proj(out, p + ".proj_in", ch, linear)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", ch), ("attn2", context_dim)):
            _linear(out, f"{b}.{attn}.to_q", ch, ch, bias=False)
            _linear(out, f"{b}.{attn}.to_k", ch, kv_dim, bias=False)
            _linear(out, f"{b}.{attn}.to_v", ch, kv_dim, bias=False)
            _linear(out, f"{b}.{attn}.to_out.0", ch, ch)
        _linear(out, f"{b}.ff.net.0.proj", 8 * ch, ch)  # GEGLU: 2 x (4 x ch)
        _linear(out, f"{b}.ff.net.2", ch, 4 * ch)
        for i in (1, 2, 3):
            _norm(out, f"{b}.norm{i}", ch)
    _proj(out, p + ".proj_out", ch, linear)


def _proj(out, prefix, ch, linear):
    """SD 2.x/SDXL project in and out of a transformer with a Linear, SD 1.x with a 1x1 conv."""
    if linear:
        _linear(out, prefix, ch, ch)
    else:
        _conv(out, prefix, ch, ch, 1)


def _level_depths(value, levels, blocks, what):
    """Transformer depth per level and block: one int for all, or one entry per level that is an int (every block
    of the level) or a list with one int per block (SSD-1B)."""
    per_level = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(per_level) != levels:
        raise ValueError(f"{what} has {len(per_level)} levels, channel_mult {levels}")
    out = [list(d) if isinstance(d, (list, tuple)) else [d] * blocks for d in per_level]
    if any(len(d) != blocks for d in out):
        raise ValueError(f"{what} needs {blocks} depths per level")
    return out


def unet_shapes(p, prefix=UNET):
    """sgm `UNetModel`: SD 1.x (1x1 conv proj_in/out, no label embedding), SD 2.x, SDXL (sequential label
    embedding) and SSD-1B (per-block depths, `transformer_depth_middle: 0`: the middle block is one ResBlock)."""
    if p.get("num_classes") not in (None, "sequential"):
        raise NotImplementedError("class-conditional UNets are none of the supported families")
    out = OrderedDict()
    mc, mult, nres = p["model_channels"], list(p["channel_mult"]), p["num_res_blocks"]
    depth_in = _level_depths(p.get("transformer_depth", 1), len(mult), nres, "transformer_depth")
    depth_out = _level_depths(p.get("transformer_depth_output", p.get("transformer_depth", 1)), len(mult), nres + 1,
                              "transformer_depth_output")
    attn_res, ctx, emb = list(p["attention_resolutions"]), p["context_dim"], 4 * p["model_channels"]
    linear = p.get("use_linear_in_transformer", False)
    pre = prefix
    _linear(out, pre + "time_embed.0", emb, mc)
    _linear(out, pre + "time_embed.2", emb, emb)
    if p.get("num_classes") == "sequential":
        _linear(out, pre + "label_emb.0.0", emb, p["adm_in_channels"])
        _linear(out, pre + "label_emb.0.2", emb, emb)
    _conv(out, pre + "input_blocks.0.0", mc, p["in_channels"], 3)
    chans, ch, ds, block = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for i in range(nres):
            _unet_resblock(out, f"{pre}input_blocks.{block}.0", ch, m * mc, emb)
            ch = m * mc
            if ds in attn_res and depth_in[level][i]:
                _unet_transformer(out, f"{pre}input_blocks.{block}.1", ch, depth_in[level][i], ctx, linear)
            chans.append(ch)
            block += 1
        if level != len(mult) - 1:
            _conv(out, f"{pre}input_blocks.{block}.0.op", ch, ch, 3)
            chans.append(ch)
            block, ds = block + 1, ds * 2
    _unet_resblock(out, pre + "middle_block.0", ch, ch, emb)
    middle_depth = p.get("transformer_depth_middle")
    middle_depth = depth_in[-1][-1] if middle_depth is None else middle_depth
    if middle_depth:  # 0: the middle block is one ResBlock (SSD-1B)
        _unet_transformer(out, pre + "middle_block.1", ch, middle_depth, ctx, linear)
        _unet_resblock(out, pre + "middle_block.2", ch, ch, emb)
    block = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nres + 1):
            b = f"{pre}output_blocks.{block}"
            _unet_resblock(out, b + ".0", ch + chans.pop(), m * mc, emb)
            ch, sub = m * mc, 1
            if ds in attn_res and depth_out[level][i]:
                _unet_transformer(out, b + ".1", ch, depth_out[level][i], ctx, linear)
                sub = 2
            if level and i == nres:
                _conv(out, f"{b}.{sub}.conv", ch, ch, 3)
                ds //= 2
            block += 1
    _norm(out, pre + "out.0", mc)
    _conv(out, pre + "out.2", p["out_channels"], mc, 3)
    return out


def clip_l_shapes(p, prefix=CLIP_L):
    """HF `CLIPTextModel` names, as the official file stores embedder 0."""
    out = OrderedDict()
    w, mlp = p["width"], p["mlp_width"]
    out[prefix + "embeddings.token_embedding.weight"] = (CLIP_VOCAB, w)
    out[prefix + "embeddings.position_embedding.weight"] = (CLIP_CONTEXT, w)
    for i in range(p["layers"]):
        b = f"{prefix}encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(out, f"{b}.self_attn.{proj}", w, w)
        _norm(out, b + ".layer_norm1", w)
        _linear(out, b + ".mlp.fc1", mlp, w)
        _linear(out, b + ".mlp.fc2", w, mlp)
        _norm(out, b + ".layer_norm2", w)
    _norm(out, prefix + "final_layer_norm", w)
    return out


def open_clip_shapes(p, prefix=CLIP_G):
    """OpenCLIP text tower names (fused attention in_proj): SDXL's bigG (embedder 1), SD 2.x's ViT-H (embedder 0).
    `text_projection` and `logit_scale` only where the embedder has a `projection_dim` (SDXL's pooled output)."""
    out = OrderedDict()
    w, mlp = p["width"], p["mlp_width"]
    out[prefix + "positional_embedding"] = (CLIP_CONTEXT, w)
    if p.get("projection_dim"):
        out[prefix + "text_projection"] = (w, p["projection_dim"])  # used as x @ text_projection
        out[prefix + "logit_scale"] = ()
    out[prefix + "token_embedding.weight"] = (CLIP_VOCAB, w)
    for i in range(p["layers"]):
        b = f"{prefix}transformer.resblocks.{i}"
        _norm(out, b + ".ln_1", w)
        out[b + ".attn.in_proj_weight"] = (3 * w, w)
        out[b + ".attn.in_proj_bias"] = (3 * w,)
        _linear(out, b + ".attn.out_proj", w, w)
        _norm(out, b + ".ln_2", w)
        _linear(out, b + ".mlp.c_fc", mlp, w)
        _linear(out, b + ".mlp.c_proj", w, mlp)
    _norm(out, prefix + "ln_final", w)
    return out


def _vae_resblock(out, p, ch_in, ch_out):
    _norm(out, p + ".norm1", ch_in)
    _conv(out, p + ".conv1", ch_out, ch_in, 3)
    _norm(out, p + ".norm2", ch_out)
    _conv(out, p + ".conv2", ch_out, ch_out, 3)
    if ch_in != ch_out:
        _conv(out, p + ".nin_shortcut", ch_out, ch_in, 1)


def _vae_attn(out, p, ch):
    _norm(out, p + ".norm", ch)
    for conv in ("q", "k", "v", "proj_out"):
        _conv(out, f"{p}.{conv}", ch, ch, 1)


def _vae_mid(out, p, ch):
    _vae_resblock(out, p + ".block_1", ch, ch)
    _vae_attn(out, p + ".attn_1", ch)
    _vae_resblock(out, p + ".block_2", ch, ch)


def vae_shapes(p, prefix=VAE):
    """sgm `AutoencoderKL` (encoder, decoder, quant convs); `p` holds `embed_dim` and `ddconfig`."""
    out = OrderedDict()
    dd = p["ddconfig"]
    ch, mult, nres, z = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"], dd["z_channels"]
    attn_res = list(dd.get("attn_resolutions", []))
    if attn_res:
        raise NotImplementedError("VAE layouts with attention inside the down/up blocks are not SDXL's")
    e = prefix + "encoder."
    _conv(out, e + "conv_in", ch, dd["in_channels"], 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            _vae_resblock(out, f"{e}down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i != len(mult) - 1:
            _conv(out, f"{e}down.{i}.downsample.conv", c, c, 3)
    _vae_mid(out, e + "mid", c)
    _norm(out, e + "norm_out", c)
    _conv(out, e + "conv_out", 2 * z if dd.get("double_z", True) else z, c, 3)
    d = prefix + "decoder."
    c = ch * mult[-1]
    _conv(out, d + "conv_in", c, z, 3)
    _vae_mid(out, d + "mid", c)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            _vae_resblock(out, f"{d}up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i != 0:
            _conv(out, f"{d}up.{i}.upsample.conv", c, c, 3)
    _norm(out, d + "norm_out", c)
    _conv(out, d + "conv_out", dd["out_ch"], c, 3)
    _conv(out, prefix + "quant_conv", 2 * p["embed_dim"], 2 * z, 1)
    _conv(out, prefix + "post_quant_conv", z, p["embed_dim"], 1)
    return out


def embedder_shapes(index: int, embedder: dict) -> dict:
    """The parameters of `conditioner.embedders.<index>`, by the embedder's class: CLIP ViT-L (transformers
    names), an OpenCLIP tower, or a parameter-free one (the size/crop embedders)."""
    kind, p = embedder["target"].rsplit(".", 1)[-1], embedder.get("params", {})
    if kind == "FrozenCLIPEmbedder":
        return clip_l_shapes(p, f"conditioner.embedders.{index}.transformer.text_model.")
    if "OpenCLIP" in kind:
        return open_clip_shapes(p, f"conditioner.embedders.{index}.model.")
    if kind == "ConcatTimestepEmbedderND":
        return {}
    raise NotImplementedError(f"no rules for the embedder {kind}")


def official_shapes(model_params) -> "OrderedDict[str, tuple]":
    """{official name: shape} of a checkpoint for `model.params` of a config, in the sgm names the model uses
    (SD 1.x/2.x files name the text encoder differently: `file_layout` maps that)."""
    out = unet_shapes(model_params["network_config"]["params"])
    for index, embedder in enumerate(model_params["conditioner_config"]["params"]["emb_models"]):
        out.update(embedder_shapes(index, embedder))
    out.update(vae_shapes(model_params["first_stage_config"]["params"]))
    return out


def load_config(path) -> dict:
    """A model YAML (through mindbooth's loader, so a `base:` include is merged) as plain dicts and lists."""
    from omegaconf import OmegaConf

    from mindbooth.config import load_config as load_yaml

    return OmegaConf.to_container(load_yaml(path), resolve=True)


# Every module the shipped configs build (configs/inference/*.yaml). The rules above describe the parameters of those
# that have any; the others (denoisers, samplers, losses, ...) have none. A config of any other module gets its
# model built instead: the rules would not know its parameters.
RULE_MODULES = frozenset({
    "gm.models.autoencoder.AutoencoderKLInferenceWrapper",
    "gm.models.diffusion.DiffusionEngine",
    "gm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
    "gm.modules.diffusionmodules.denoiser_scaling.EpsScaling",
    "gm.modules.diffusionmodules.denoiser_scaling.VScaling",
    "gm.modules.diffusionmodules.denoiser_weighting.VWeighting",
    "gm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
    "gm.modules.diffusionmodules.guiders.VanillaCFG",
    "gm.modules.diffusionmodules.loss.StandardDiffusionLoss",
    "gm.modules.diffusionmodules.openaimodel.UNetModel",
    "gm.modules.diffusionmodules.sampler.EulerEDMSampler",
    "gm.modules.diffusionmodules.sigma_sampling.DiscreteSampling",
    "gm.modules.embedders.modules.ConcatTimestepEmbedderND",
    "gm.modules.embedders.modules.FrozenCLIPEmbedder",
    "gm.modules.embedders.modules.FrozenOpenCLIPEmbedder",
    "gm.modules.embedders.modules.FrozenOpenCLIPEmbedder2",
    "gm.modules.embedders.modules.GeneralConditioner",
})


def config_targets(node) -> list:
    """Every `target` in a config tree, depth first in file order."""
    if isinstance(node, dict):
        own = [node["target"]] if isinstance(node.get("target"), str) else []
        return own + [t for key, value in node.items() if key != "target" for t in config_targets(value)]
    if isinstance(node, list):
        return [t for item in node for t in config_targets(item)]
    return []


def rule_mindspore_shapes(config_path):
    """{MindSpore parameter name: shape} of the model a config builds, by the rules (no MindSpore, no model),
    or None when the config has a module outside `RULE_MODULES` or numbers outside what the rules describe (the
    caller then builds the model). Equal to `model_mindspore_shapes` where not None: tested on every shipped config,
    and the rules read the same numbers the modules do."""
    from tools.model_conversion.keymap import official_to_mindspore_names

    model = load_config(config_path).get("model")
    if not isinstance(model, dict) or not set(config_targets(model)) <= RULE_MODULES:
        return None
    try:
        shapes = official_shapes(model["params"])
    except (KeyError, TypeError, ValueError, NotImplementedError):  # e.g. num_res_blocks per level
        return None
    names = official_to_mindspore_names(shapes)
    return {names[name]: tuple(shape) for name, shape in shapes.items()}


# ---------------------------------------------------------------- model-derived expectation
def model_mindspore_shapes(config_path) -> dict:
    """{MindSpore parameter name: shape} of the model a config builds, with no weight allocated.

    This is what a converted checkpoint must load into, strictly. Built with the plain backend: a backend adds no
    parameters, and the CPU backend's kernels would be compiled with g++ on a fresh machine.
    """
    from mindspore.nn.utils import no_init_parameters

    from gm.util import instantiate_from_config

    config = load_config(config_path)
    with no_init_parameters():
        model = instantiate_from_config(config["model"], backend="plain")
    return {name: tuple(int(d) for d in p.shape) for name, p in model.parameters_and_names()}

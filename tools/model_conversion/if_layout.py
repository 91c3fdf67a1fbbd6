"""What a MindBooth DeepFloyd IF checkpoint contains, from a config's numbers alone (no MindSpore, nothing allocated).

A MindBooth IF checkpoint holds the UNet under `model.diffusion_model.<diffusers UNet2DConditionModel name>` and,
for stage I, the T5 v1.1 encoder under `conditioner.embedders.<i>.transformer.<transformers T5EncoderModel name>`
(IF's weights are only released as diffusers folders, and MindBooth's IFUNet / T5EncoderModel keep those names one to
one: no gamma/beta renames as for the sgm families).

`if_config(path)` reads an IF config in either shape: the UNet itself as `model` (IFUNet params in `model.params`),
or an engine whose `model.params.network_config` is the IFUNet (and whose conditioner may hold a FrozenT5Embedder).
`if_unet_shapes(params)` and `t5_shapes(params)` give the names and shapes as gm/modules/diffusionmodules/if_unet.py
and gm/modules/embedders/t5.py build them (tests/test_convert_if.py holds them equal to the models and to
diffusers/transformers for IF-I-XL, IF-II-L and T5-XXL).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

IF_UNET_TARGET = "gm.modules.diffusionmodules.if_unet.IFUNet"
T5_EMBEDDER = "FrozenT5Embedder"
UNET_PREFIX = "model.diffusion_model."
# FrozenT5Embedder's defaults: T5 v1.1 XXL, IF's text encoder (the test holds them equal to the class's signature)
T5_XXL = dict(vocab_size=32128, width=4096, ff_width=10240, layers=24, heads=64, head_dim=64, num_buckets=32)
STAGE_CONFIGS = {1: "configs/inference/if_i_xl.yaml", 2: "configs/inference/if_ii_l.yaml"}


@dataclass
class IFConfig:
    unet: dict                    # IFUNet params (diffusers UNet2DConditionModel fields)
    stage: int                    # 1: text -> 64 px; 2: super-resolution (class_labels = noise level)
    t5_prefix: Optional[str]      # where the T5 encoder's names go, None when the model has no text encoder
    t5: Optional[dict]            # T5 numbers (T5_XXL keys)


def _node(value, kind=dict):
    """A config node of the kind expected, else an empty one (`conditioner_config: __is_unconditional__` is a string:
    stage II has no conditioner of its own)."""
    return value if isinstance(value, kind) else kind()


def _per_level(value, levels):
    return [value] * levels if isinstance(value, (int, bool)) else list(value)


def if_config(path) -> Optional[IFConfig]:
    """The IF parts of a config, or None when the config is no DeepFloyd IF model."""
    from tools.model_conversion.sdxl_layout import load_config

    model = load_config(path).get("model")
    if not isinstance(model, dict):
        return None
    params = model.get("params") or {}
    if model.get("target") == IF_UNET_TARGET:  # the UNet alone: a stage I UNet still pairs with T5-XXL
        unet, embedders = params, None
    else:
        network = _node(params).get("network_config")
        if not isinstance(network, dict) or network.get("target") != IF_UNET_TARGET:
            return None
        unet = network.get("params") or {}
        embedders = _node(_node(_node(params.get("conditioner_config")).get("params")).get("emb_models"), list)
    stage = 2 if unet.get("class_embed_type") == "timestep" else 1
    if embedders is None:
        t5_prefix, t5 = ("conditioner.embedders.0.transformer.", dict(T5_XXL)) if stage == 1 else (None, None)
    else:
        found = [(i, e) for i, e in enumerate(embedders)
                 if isinstance(e, dict) and str(e.get("target", "")).endswith("." + T5_EMBEDDER)]
        if found:
            index, embedder = found[0]
            numbers = {k: v for k, v in _node(embedder.get("params")).items() if k in T5_XXL}
            t5_prefix, t5 = f"conditioner.embedders.{index}.transformer.", {**T5_XXL, **numbers}
        else:
            t5_prefix, t5 = None, None
    return IFConfig(unet=unet, stage=stage, t5_prefix=t5_prefix, t5=t5)


# ---------------------------------------------------------------- UNet (gm/modules/diffusionmodules/if_*.py)
def _dense(out, prefix, n_in, n_out):
    out[prefix + ".weight"] = (n_out, n_in)
    out[prefix + ".bias"] = (n_out,)


def _conv(out, prefix, n_in, n_out, k):
    out[prefix + ".weight"] = (n_out, n_in, k, k)
    out[prefix + ".bias"] = (n_out,)


def _norm(out, prefix, n):
    out[prefix + ".weight"] = (n,)
    out[prefix + ".bias"] = (n,)


def _resnet(out, p, ch_in, ch_out, temb, scale_shift):
    _norm(out, p + ".norm1", ch_in)
    _conv(out, p + ".conv1", ch_in, ch_out, 3)
    _dense(out, p + ".time_emb_proj", temb, 2 * ch_out if scale_shift else ch_out)
    _norm(out, p + ".norm2", ch_out)
    _conv(out, p + ".conv2", ch_out, ch_out, 3)
    if ch_in != ch_out:
        _conv(out, p + ".conv_shortcut", ch_in, ch_out, 1)


def _attention(out, p, ch, text_dim, head_dim, cross_norm, only_cross):
    inner = (ch // head_dim) * head_dim
    _norm(out, p + ".group_norm", ch)
    if cross_norm:
        _norm(out, p + ".norm_cross", text_dim)
    _dense(out, p + ".to_q", ch, inner)
    if not only_cross:
        _dense(out, p + ".to_k", ch, inner)
        _dense(out, p + ".to_v", ch, inner)
    _dense(out, p + ".add_k_proj", text_dim, inner)
    _dense(out, p + ".add_v_proj", text_dim, inner)
    _dense(out, p + ".to_out.0", inner, ch)


def if_unet_shapes(p: dict, prefix: str = UNET_PREFIX) -> "OrderedDict[str, tuple]":
    """{name: shape} of IFUNet(**p), in the model's (and diffusers' state dict's) order."""
    out = OrderedDict()
    channels = list(p.get("block_out_channels", (704, 1408, 2112, 2816)))
    levels = len(channels)
    down_types = list(p.get("down_block_types", ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3))
    up_types = list(p.get("up_block_types", ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"]))
    layers = _per_level(p.get("layers_per_block", 3), levels)
    head_dims = _per_level(p.get("attention_head_dim", 64), levels)
    only_cross_value = p.get("only_cross_attention", False)
    mid_only_cross = p.get("mid_block_only_cross_attention")
    if isinstance(only_cross_value, bool) and mid_only_cross is None:
        mid_only_cross = only_cross_value
    only_cross = _per_level(only_cross_value, levels)
    cross_dim = p.get("cross_attention_dim", 2816)
    hid_dim = p.get("encoder_hid_dim", 4096)
    text_dim = cross_dim  # the attentions see the projected text
    temb = p.get("time_embedding_dim") or channels[0] * 4
    scale_shift = p.get("resnet_time_scale_shift", "scale_shift") == "scale_shift"
    cross_norm = p.get("cross_attention_norm", "group_norm") is not None
    pre = prefix

    _conv(out, pre + "conv_in", p.get("in_channels", 3), channels[0], 3)
    _dense(out, pre + "time_embedding.linear_1", channels[0], temb)
    _dense(out, pre + "time_embedding.linear_2", temb, temb)
    if hid_dim:
        _dense(out, pre + "encoder_hid_proj", hid_dim, cross_dim)
    if p.get("class_embed_type") == "timestep":
        _dense(out, pre + "class_embedding.linear_1", channels[0], temb)
        _dense(out, pre + "class_embedding.linear_2", temb, temb)
    if p.get("addition_embed_type", "text") == "text":
        width = hid_dim or cross_dim
        _norm(out, pre + "add_embedding.norm1", width)
        out[pre + "add_embedding.pool.positional_embedding"] = (1, width)
        for proj in ("k_proj", "q_proj", "v_proj"):
            _dense(out, f"{pre}add_embedding.pool.{proj}", width, width)
        _dense(out, pre + "add_embedding.proj", width, temb)
        _norm(out, pre + "add_embedding.norm2", temb)

    ch_out = channels[0]
    for i, kind in enumerate(down_types):
        ch_in, ch_out = ch_out, channels[i]
        b = f"{pre}down_blocks.{i}"
        if kind == "SimpleCrossAttnDownBlock2D":
            for j in range(layers[i]):
                _attention(out, f"{b}.attentions.{j}", ch_out, text_dim, head_dims[i], cross_norm, only_cross[i])
        for j in range(layers[i]):
            _resnet(out, f"{b}.resnets.{j}", ch_in if j == 0 else ch_out, ch_out, temb, scale_shift)
        if i < levels - 1:
            _resnet(out, f"{b}.downsamplers.0", ch_out, ch_out, temb, scale_shift)

    rev_channels, rev_layers = channels[::-1], layers[::-1]
    rev_heads, rev_only_cross = head_dims[::-1], only_cross[::-1]
    ch_out = rev_channels[0]
    for i, kind in enumerate(up_types):
        prev, ch_out = ch_out, rev_channels[i]
        ch_in = rev_channels[min(i + 1, levels - 1)]
        count = rev_layers[i] + 1
        b = f"{pre}up_blocks.{i}"
        if kind == "SimpleCrossAttnUpBlock2D":
            for j in range(count):
                _attention(out, f"{b}.attentions.{j}", ch_out, text_dim, rev_heads[i], cross_norm, rev_only_cross[i])
        for j in range(count):
            skip = ch_in if j == count - 1 else ch_out
            _resnet(out, f"{b}.resnets.{j}", (prev if j == 0 else ch_out) + skip, ch_out, temb, scale_shift)
        if i < levels - 1:
            _resnet(out, f"{b}.upsamplers.0", ch_out, ch_out, temb, scale_shift)

    last = channels[-1]
    _attention(out, pre + "mid_block.attentions.0", last, text_dim, head_dims[-1], cross_norm, bool(mid_only_cross))
    for j in range(2):
        _resnet(out, f"{pre}mid_block.resnets.{j}", last, last, temb, scale_shift)
    _norm(out, pre + "conv_norm_out", channels[0])
    _conv(out, pre + "conv_out", channels[0], p.get("out_channels", 6), 3)
    return out


# ---------------------------------------------------------------- T5 v1.1 encoder (gm/modules/embedders/t5.py)
def t5_shapes(t5: dict, prefix: str = "") -> "OrderedDict[str, tuple]":
    """{name: shape} of T5EncoderModel in transformers' names: the token table once, as `shared.weight`."""
    out = OrderedDict()
    width, inner, ff = t5["width"], t5["heads"] * t5["head_dim"], t5["ff_width"]
    out[prefix + "shared.weight"] = (t5["vocab_size"], width)
    for i in range(t5["layers"]):
        b = f"{prefix}encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            out[f"{b}.0.SelfAttention.{name}.weight"] = (inner, width)
        out[f"{b}.0.SelfAttention.o.weight"] = (width, inner)
        if i == 0:
            out[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = (t5["num_buckets"], t5["heads"])
        out[f"{b}.0.layer_norm.weight"] = (width,)
        out[f"{b}.1.DenseReluDense.wi_0.weight"] = (ff, width)
        out[f"{b}.1.DenseReluDense.wi_1.weight"] = (ff, width)
        out[f"{b}.1.DenseReluDense.wo.weight"] = (width, ff)
        out[f"{b}.1.layer_norm.weight"] = (width,)
    out[prefix + "encoder.final_layer_norm.weight"] = (width,)
    return out


def checkpoint_shapes(config: IFConfig, unet: bool = True, text_encoder: bool = True) -> "OrderedDict[str, tuple]":
    """{checkpoint name: shape} of the parts asked for."""
    out = OrderedDict()
    if unet:
        out.update(if_unet_shapes(config.unet))
    if text_encoder and config.t5_prefix:
        out.update(t5_shapes(config.t5, config.t5_prefix))
    return out

"""DeepFloyd IF's pixel-space UNet (stage I: 64x64 from text; stage II: 256x256 from text and the upscaled 64x64
image), as diffusers' `UNet2DConditionModel` builds it for IF.

Parameters are diffusers' `UNet2DConditionModel` fields for IF, under the same names, so a released
`unet/config.json` gives the YAML `params` as is (see configs/inference/if_i_xl.yaml); parameter names equal the
released state dict's (gm/modules/diffusionmodules/if_layers.py says how norms are named). Fields IF does not use must
keep diffusers' defaults: anything else is refused with a one-line reason.

Forward: (x (B, in_channels, H, W), timesteps (B,) or scalar, context (B, L, encoder_hid_dim) T5 embeddings,
class_labels (B,) the noise level of stage II's low-resolution image, or None) -> (B, out_channels, H, W): the noise
and, IF's variance being learnt, the variance interpolation (IF pipelines split the 6 channels 3 + 3).
IF's pipelines pass no encoder attention mask to the UNet (the padded T5 tokens are attended to), so there is none.
"""
from typing import Sequence, Union

from mindspore import nn, ops

from gm.modules.diffusionmodules.if_blocks import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, IFDownBlock, IFMidBlock, IFUpBlock
from gm.modules.diffusionmodules.if_layers import GroupNorm, TextTimeEmbedding, TimestepEmbedding, activation
from gm.modules.diffusionmodules.util import conv2d, timestep_embedding
from gm.modules.frozen_weights import stored_in

# diffusers' UNet2DConditionModel fields that IF's configurations leave at these values: accepted (a released
# config.json lists them all) but only with the value the code here implements.
FIXED_FIELDS = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "dual_cross_attention": False, "use_linear_projection": False, "upcast_attention": False,
    "num_class_embeds": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False, "encoder_hid_dim_type": "text_proj",
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
    "addition_time_embed_dim": None,
}


def _per_level(value, levels: int, name: str) -> list:
    """One value per level from an int/bool or from a sequence (a list, a tuple, an OmegaConf ListConfig)."""
    if isinstance(value, (int, bool)):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} has {len(value)} entries but block_out_channels has {levels} levels")
    return value


class IFUNet(nn.Cell):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 6,
        block_out_channels: Sequence[int] = (704, 1408, 2112, 2816),
        down_block_types: Sequence[str] = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                           "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types: Sequence[str] = ("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                                         "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn",
        layers_per_block: Union[int, Sequence[int]] = 3,
        attention_head_dim: Union[int, Sequence[int]] = 64,
        cross_attention_dim: int = 2816,
        encoder_hid_dim: int = 4096,
        addition_embed_type: str = "text",
        addition_embed_type_num_heads: int = 64,
        class_embed_type: str = None,
        act_fn: str = "gelu",
        time_embedding_act_fn: str = "gelu",
        time_embedding_dim: int = None,
        resnet_time_scale_shift: str = "scale_shift",
        resnet_skip_time_act: bool = True,
        resnet_out_scale_factor: float = 1.4142135623730951,
        mid_block_scale_factor: float = 1.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_norm: str = "group_norm",
        only_cross_attention: Union[bool, Sequence[bool]] = False,
        mid_block_only_cross_attention: bool = None,
        dropout: float = 0.0,
        sample_size: int = 64,
        spatial_transformer_attn_type: str = "vanilla",
        weight_dtype: str = None,
        **diffusers_fields,
    ):
        """`spatial_transformer_attn_type`: vanilla | flash-attention (Ascend), as the other UNets' configs.
        `weight_dtype` (float16/bfloat16, DiffusionEngine's frozen_weight_dtype): each block's weights go to that dtype
        as soon as it is built, as UNetModel's do, so the 4.3B stage I never exists in fp32.
        `diffusers_fields`: the rest of a released config.json (FIXED_FIELDS at their values; `_`-keys ignored)."""
        super().__init__()
        store = (lambda block: stored_in(block, weight_dtype)) if weight_dtype else (lambda block: block)
        self._check_fields(diffusers_fields)
        if addition_embed_type not in ("text", None):
            raise ValueError(f"addition_embed_type must be 'text' (IF) or None, got {addition_embed_type!r}")
        if class_embed_type not in ("timestep", None):
            raise ValueError(f"class_embed_type must be 'timestep' (IF stage II) or None, got {class_embed_type!r}")
        if mid_block_type != "UNetMidBlock2DSimpleCrossAttn":
            raise ValueError(f"mid_block_type must be 'UNetMidBlock2DSimpleCrossAttn' (IF), got {mid_block_type!r}")
        levels = len(block_out_channels)
        for name, types, known in (("down_block_types", down_block_types, DOWN_BLOCK_TYPES),
                                   ("up_block_types", up_block_types, UP_BLOCK_TYPES)):
            if len(types) != levels or any(kind not in known for kind in types):
                raise ValueError(f"{name} must give one of {sorted(known)} for each of the {levels} levels, got "
                                 f"{list(types)}")
        layers_per_block = _per_level(layers_per_block, levels, "layers_per_block")
        attention_head_dim = _per_level(attention_head_dim, levels, "attention_head_dim")
        if isinstance(only_cross_attention, bool):
            mid_block_only_cross_attention = (only_cross_attention if mid_block_only_cross_attention is None
                                              else mid_block_only_cross_attention)
        mid_block_only_cross_attention = bool(mid_block_only_cross_attention)
        only_cross_attention = _per_level(only_cross_attention, levels, "only_cross_attention")
        self.sample_size = sample_size
        self.class_embed_type = class_embed_type

        self.conv_in = conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.timestep_input_dim = block_out_channels[0]
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_embedding = TimestepEmbedding(self.timestep_input_dim, time_embed_dim, act_fn)
        self.encoder_hid_proj = nn.Dense(encoder_hid_dim, cross_attention_dim) if encoder_hid_dim else None
        self.class_embedding = (TimestepEmbedding(self.timestep_input_dim, time_embed_dim, act_fn)
                                if class_embed_type == "timestep" else None)
        self.add_embedding = (TextTimeEmbedding(encoder_hid_dim or cross_attention_dim, time_embed_dim,
                                                addition_embed_type_num_heads)
                              if addition_embed_type == "text" else None)
        self.time_embed_act = activation(time_embedding_act_fn) if time_embedding_act_fn else None

        resnet_kwargs = dict(groups=norm_num_groups, eps=norm_eps, act_fn=act_fn,
                             time_embedding_norm=resnet_time_scale_shift, skip_time_act=resnet_skip_time_act,
                             output_scale_factor=resnet_out_scale_factor, dropout=dropout)
        attention_kwargs = dict(cross_attention_norm=cross_attention_norm, attn_type=spatial_transformer_attn_type)
        down_blocks, output_channel = [], block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            down_blocks.append(store(IFDownBlock(
                input_channel, output_channel, time_embed_dim, layers_per_block[i], i < levels - 1, resnet_kwargs,
                cross_attention_dim if DOWN_BLOCK_TYPES[kind] else None, attention_head_dim[i],
                only_cross_attention=only_cross_attention[i], **attention_kwargs)))
        self.down_blocks = nn.CellList(down_blocks)

        reversed_channels = list(reversed(block_out_channels))
        reversed_layers, reversed_heads = list(reversed(layers_per_block)), list(reversed(attention_head_dim))
        reversed_only_cross = list(reversed(only_cross_attention))
        up_blocks, output_channel = [], reversed_channels[0]
        for i, kind in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, levels - 1)]
            up_blocks.append(store(IFUpBlock(
                input_channel, prev_output_channel, output_channel, time_embed_dim, reversed_layers[i] + 1,
                i < levels - 1, resnet_kwargs, cross_attention_dim if UP_BLOCK_TYPES[kind] else None,
                reversed_heads[i], only_cross_attention=reversed_only_cross[i], **attention_kwargs)))
        self.up_blocks = nn.CellList(up_blocks)
        # Built after the up blocks: diffusers registers up_blocks first, and parameter order is the state-dict order
        self.mid_block = store(IFMidBlock(
            block_out_channels[-1], time_embed_dim, dict(resnet_kwargs, output_scale_factor=mid_block_scale_factor),
            cross_attention_dim, attention_head_dim[-1], only_cross_attention=mid_block_only_cross_attention,
            **attention_kwargs))

        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], norm_eps)
        self.conv_act = activation(act_fn)
        self.conv_out = conv2d(block_out_channels[0], out_channels, 3, padding=1)
        store(self)  # the small layers outside the blocks

    @staticmethod
    def _check_fields(fields: dict):
        for name, value in fields.items():
            if name.startswith("_"):  # _class_name, _diffusers_version, _name_or_path
                continue
            if name not in FIXED_FIELDS:
                raise ValueError(f"IFUNet has no parameter {name!r}")
            expected = FIXED_FIELDS[name]
            if value != expected and not (name == "transformer_layers_per_block" and not isinstance(value, int)
                                            and set(value) == {1}):
                raise ValueError(f"IFUNet supports {name}={expected!r} only (IF's value), got {value!r}")

    def embed(self, x, timesteps, context, class_labels=None):
        """The time embedding every ResnetBlock gets: time MLP + noise-level MLP (stage II) + pooled text, activated."""
        batch = x.shape[0]
        timesteps = ops.broadcast_to(timesteps.reshape(-1), (batch,))
        emb = self.time_embedding(timestep_embedding(timesteps, self.timestep_input_dim).astype(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this IF UNet (class_embed_type 'timestep') needs class_labels: the noise level of "
                                 "the upscaled low-resolution image")
            class_labels = ops.broadcast_to(class_labels.reshape(-1), (batch,))
            emb = emb + self.class_embedding(timestep_embedding(class_labels, self.timestep_input_dim).astype(x.dtype))
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(context)  # the T5 embeddings before encoder_hid_proj
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    def construct(self, x, timesteps, context, class_labels=None):
        emb = self.embed(x, timesteps, context, class_labels)
        text = self.encoder_hid_proj(context) if self.encoder_hid_proj is not None else context
        h = self.conv_in(x)
        skips = (h,)
        for block in self.down_blocks:
            h, states = block(h, emb, text)
            skips += states
        h = self.mid_block(h, emb, text)
        for block in self.up_blocks:
            count = len(block.resnets)
            h = block(h, skips[len(skips) - count:], emb, text)
            skips = skips[:len(skips) - count]
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

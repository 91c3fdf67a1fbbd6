"""The down, middle and up blocks of IF's UNet, as diffusers' ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D,
UNetMidBlock2DSimpleCrossAttn and ResnetUpsampleBlock2D / SimpleCrossAttnUpBlock2D build them (same child names:
`resnets`, `attentions`, `downsamplers`, `upsamplers`). A block without attention is the same class with
`cross_attention_dim=None`. Attentions are built before resnets, as diffusers registers them: parameter order is
the state-dict order."""
from mindspore import nn, ops

from gm.modules.diffusionmodules.if_layers import AddedKVAttention, ResnetBlock2D

DOWN_BLOCK_TYPES = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}  # type -> has attention
UP_BLOCK_TYPES = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}


def _attentions(count: int, channels: int, cross_attention_dim: int, attention_head_dim: int, groups: int,
                cross_attention_norm, only_cross_attention: bool, attn_type: str):
    if cross_attention_dim is None:
        return None
    if channels % attention_head_dim:
        raise ValueError(f"attention_head_dim {attention_head_dim} does not divide the block width {channels}")
    return nn.CellList([
        AddedKVAttention(channels, cross_attention_dim, channels // attention_head_dim, attention_head_dim, groups,
                         cross_attention_norm, only_cross_attention, attn_type=attn_type)
        for _ in range(count)
    ])


class IFDownBlock(nn.Cell):
    """`num_layers` resnets (each followed by its attention when the block has one), then a down-resnet unless it is
    the last level. Returns the output and every intermediate state the up path takes as a skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, add_downsample: bool,
                 resnet_kwargs: dict, cross_attention_dim: int = None, attention_head_dim: int = 64,
                 cross_attention_norm: str = None, only_cross_attention: bool = False, attn_type: str = "vanilla"):
        super().__init__()
        self.attentions = _attentions(num_layers, out_channels, cross_attention_dim, attention_head_dim,
                                      resnet_kwargs["groups"], cross_attention_norm, only_cross_attention, attn_type)
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, **resnet_kwargs)
            for i in range(num_layers)
        ])
        self.downsamplers = (nn.CellList([ResnetBlock2D(out_channels, out_channels, temb_channels, down=True,
                                                        **resnet_kwargs)])
                             if add_downsample else None)

    def construct(self, x, temb, text):
        states = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, text)
            states += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)
            states += (x,)
        return x, states


class IFMidBlock(nn.Cell):
    """UNetMidBlock2DSimpleCrossAttn: resnet, attention, resnet."""

    def __init__(self, channels: int, temb_channels: int, resnet_kwargs: dict, cross_attention_dim: int,
                 attention_head_dim: int, cross_attention_norm: str = None, only_cross_attention: bool = False,
                 attn_type: str = "vanilla"):
        super().__init__()
        self.attentions = _attentions(1, channels, cross_attention_dim, attention_head_dim, resnet_kwargs["groups"],
                                      cross_attention_norm, only_cross_attention, attn_type)
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, temb_channels, **resnet_kwargs)
                                    for _ in range(2)])

    def construct(self, x, temb, text):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, text)
        return self.resnets[1](x, temb)


class IFUpBlock(nn.Cell):
    """`num_layers` resnets, each on the concatenation of the running state and the next skip (popped from the end),
    each followed by its attention when the block has one, then an up-resnet unless it is the last level."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, add_upsample: bool, resnet_kwargs: dict, cross_attention_dim: int = None,
                 attention_head_dim: int = 64, cross_attention_norm: str = None, only_cross_attention: bool = False,
                 attn_type: str = "vanilla"):
        super().__init__()
        self.attentions = _attentions(num_layers, out_channels, cross_attention_dim, attention_head_dim,
                                      resnet_kwargs["groups"], cross_attention_norm, only_cross_attention, attn_type)
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in_channels + skip_channels, out_channels, temb_channels,
                                         **resnet_kwargs))
        self.resnets = nn.CellList(resnets)
        self.upsamplers = (nn.CellList([ResnetBlock2D(out_channels, out_channels, temb_channels, up=True,
                                                      **resnet_kwargs)])
                           if add_upsample else None)

    def construct(self, x, skips, temb, text):
        count = len(skips)
        for i, resnet in enumerate(self.resnets):
            x = resnet(ops.cat((x, skips[count - 1 - i]), axis=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, text)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, temb)
        return x

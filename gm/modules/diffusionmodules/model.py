"""The KL autoencoder's encoder and decoder (LDM / sgm `diffusionmodules/model.py`).

Parameter names follow the official checkpoint: `down.N.block.M`, `mid.block_1/attn_1/block_2`,
`up.N.block.M`, where `up` is indexed by resolution level (up.0 is the highest resolution) even
though the decoder runs it from the lowest level up.
"""
from mindspore import nn, ops

from gm.modules.diffusionmodules.util import conv2d, normalization

VAE_NORM_EPS = 1e-6  # every VAE GroupNorm uses 1e-6 (the UNet's use 1e-5)


def Normalize(channels: int) -> nn.GroupNorm:
    return normalization(channels, eps=VAE_NORM_EPS)


def nonlinearity(x):
    """swish / SiLU"""
    return x * ops.sigmoid(x)


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    return conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)


class ResnetBlock(nn.Cell):
    """GroupNorm-swish-conv twice, plus a 1x1-projected shortcut where the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.has_shortcut_projection = in_channels != out_channels
        if self.has_shortcut_projection:
            self.nin_shortcut = conv(in_channels, out_channels, 1)

    def construct(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.has_shortcut_projection:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over all pixels, with 1x1-conv projections and a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = conv(in_channels, in_channels, 1)
        self.k = conv(in_channels, in_channels, 1)
        self.v = conv(in_channels, in_channels, 1)
        self.proj_out = conv(in_channels, in_channels, 1)
        self.scale = in_channels ** -0.5
        self.softmax = ops.Softmax(axis=-1)
        self.matmul_transposed_a = ops.BatchMatMul(transpose_a=True)
        self.matmul_transposed_b = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        h = self.norm(x)
        b, c, height, width = h.shape
        q, k, v = (layer(h).reshape(b, c, height * width) for layer in (self.q, self.k, self.v))  # (b, c, hw)
        # The transposes sit in BatchMatMul's flags: the (hw, hw) weights are 1 GiB for a 1024x1024 image.
        weights = self.softmax(self.matmul_transposed_a(q, k) * self.scale)  # (b, hw query, hw key)
        h = self.matmul_transposed_b(v, weights).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Cell):
    """Stride-2 3x3 conv after padding only right and bottom, as LDM (no padding inside the conv)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = conv(in_channels, in_channels, 3, stride=2)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = conv(in_channels, in_channels, 3, padding=1)

    def construct(self, x):
        height, width = x.shape[-2:]
        return self.conv(ops.interpolate(x, size=(height * 2, width * 2), mode="nearest"))


class MidBlock(nn.Cell):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def construct(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Cell):
    """One resolution level: ResnetBlocks (each followed by attention where the level has it),
    then an optional resampler, named `downsample` or `upsample` as in the checkpoint."""

    def __init__(self, widths, use_attention: bool, dropout: float, resample: str = None):
        super().__init__()
        self.block = nn.CellList([ResnetBlock(i, o, dropout) for i, o in zip(widths[:-1], widths[1:])])
        self.attn = nn.CellList([AttnBlock(o) for o in widths[1:]] if use_attention else [])
        self.use_attention = use_attention
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(widths[-1])
        elif resample == "upsample":
            self.upsample = Upsample(widths[-1])

    def construct(self, h):
        for i in range(len(self.block)):
            h = self.block[i](h)
            if self.use_attention:
                h = self.attn[i](h)
        if self.resample == "downsample":
            h = self.downsample(h)
        elif self.resample == "upsample":
            h = self.upsample(h)
        return h


def _check_ddconfig(ch, ch_mult, num_res_blocks, attn_type, resamp_with_conv, ignored):
    if not ch_mult or num_res_blocks < 1:
        raise ValueError(f"ddconfig needs a non-empty ch_mult and num_res_blocks >= 1, got {ch_mult}, {num_res_blocks}")
    if any((ch * m) % 32 for m in ch_mult):
        raise ValueError(f"every width ch * ch_mult must be a multiple of 32 (GroupNorm groups), got ch={ch}, ch_mult={list(ch_mult)}")
    if attn_type not in ("vanilla", "vanilla-xformers"):
        raise ValueError(f"ddconfig attn_type '{attn_type}' is not supported; use 'vanilla'")
    if not resamp_with_conv:
        raise ValueError("ddconfig resamp_with_conv=False is not supported (SDXL's VAE resamples with convs)")
    if ignored.get("tanh_out") or ignored.get("give_pre_end") or ignored.get("use_linear_attn"):
        raise ValueError("ddconfig tanh_out / give_pre_end / use_linear_attn are not supported")


class Encoder(nn.Cell):
    """Image (B, in_channels, H, W) -> (B, 2*z_channels if double_z else z_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(
        self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
        double_z=True, dropout=0.0, resamp_with_conv=True, attn_type="vanilla", **ignored,
    ):  # fmt: skip
        super().__init__()
        _check_ddconfig(ch, ch_mult, num_res_blocks, attn_type, resamp_with_conv, ignored)
        levels = len(ch_mult)
        self.conv_in = conv(in_channels, ch, 3, padding=1)
        down, block_in, res = [], ch, resolution
        for i_level, mult in enumerate(ch_mult):
            widths = [block_in] + [ch * mult] * num_res_blocks
            last = i_level == levels - 1
            down.append(Level(widths, res in attn_resolutions, dropout, None if last else "downsample"))
            block_in = widths[-1]
            res = res if last else res // 2
        self.down = nn.CellList(down)
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = conv(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Cell):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(
        self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
        dropout=0.0, resamp_with_conv=True, attn_type="vanilla", **ignored,
    ):  # fmt: skip
        super().__init__()
        _check_ddconfig(ch, ch_mult, num_res_blocks, attn_type, resamp_with_conv, ignored)
        levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (levels - 1)
        self.conv_in = conv(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        up = []  # built from the lowest resolution up, stored highest resolution first
        for i_level in reversed(range(levels)):
            widths = [block_in] + [ch * ch_mult[i_level]] * (num_res_blocks + 1)
            up.append(Level(widths, res in attn_resolutions, dropout, "upsample" if i_level else None))
            block_in = widths[-1]
            res = res * 2 if i_level else res
        self.up = nn.CellList(up[::-1])
        self.norm_out = Normalize(block_in)
        self.conv_out = conv(block_in, out_ch, 3, padding=1)

    def construct(self, z):
        h = self.mid(self.conv_in(z))
        for i_level in range(len(self.up) - 1, -1, -1):
            h = self.up[i_level](h)
        return self.conv_out(nonlinearity(self.norm_out(h)))

"""The UNet of SD 1.x/2.x, SDXL and SSD-1B (sgm's `openaimodel.UNetModel`), with the official checkpoints' block
numbering: input_blocks / middle_block / output_blocks, each a TimestepEmbedSequential of ResBlocks,
SpatialTransformers and Down/Upsamplers."""
from typing import List, Sequence, Union

from mindspore import nn, ops

from gm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from gm.modules.frozen_weights import stored_in
from gm.modules.diffusionmodules.util import conv2d, normalization, timestep_embedding, zero_module


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class ResBlock(nn.Cell):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.SequentialCell([normalization(channels), nn.SiLU(), conv3x3(channels, out_channels)])
        self.emb_layers = nn.SequentialCell([nn.SiLU(), nn.Dense(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell(
            [normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout), zero_module(conv3x3(out_channels, out_channels))]
        )
        self.has_skip_projection = out_channels != channels
        if self.has_skip_projection:
            self.skip_connection = conv2d(channels, out_channels, 1)

    def add_embedding(self, h, emb_out):
        """h (B, C, H, W) plus the projected time embedding emb_out (B, C) at every pixel."""
        return h + emb_out[:, :, None, None]

    def construct(self, x, emb):
        h = self.in_layers(x)
        h = self.add_embedding(h, self.emb_layers(emb))
        h = self.out_layers(h)
        skip = self.skip_connection(x) if self.has_skip_projection else x
        return skip + h


class Downsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def construct(self, x):
        return self.op(x)


class NearestUpsample2x(nn.Cell):
    """(N, C, H, W) -> (N, C, 2H, 2W), each pixel repeated over a 2x2 block."""

    def construct(self, x):
        height, width = x.shape[-2:]
        return ops.interpolate(x, size=(height * 2, width * 2), mode="nearest")


class Upsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.upsample = NearestUpsample2x()
        self.conv = conv3x3(channels, channels)

    def construct(self, x):
        return self.conv(self.upsample(x))


class TimestepEmbedSequential(nn.SequentialCell):
    """Runs its layers in order, giving each the inputs it needs (time embedding, or text context and its cached
    cross-attention keys/values). `kv_start`/`kv_count`: where this block's keys/values are in the UNet's `cached_kv`
    (set by UNetModel from the block's position)."""

    kv_start, kv_count = 0, 0

    def construct(self, x, emb, context, cached_kv=None):
        if cached_kv is not None:
            cached_kv = cached_kv[self.kv_start:self.kv_start + self.kv_count]
        for layer in self.cell_list:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, cached_kv)
            else:
                x = layer(x)
        return x


def _per_level(value: Union[int, Sequence[int]], levels: int, name: str) -> List[int]:
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} has {len(value)} entries but channel_mult has {levels} levels; give one per level")
    return value


def _per_block(value, levels: int, blocks: List[int], name: str) -> List[List[int]]:
    """Transformer depths per level, each an int or a list with one depth per block of that level ->
    [[depth of each block] for each level]."""
    per_level = _per_level(value, levels, name)
    depths = []
    for level, (entry, count) in enumerate(zip(per_level, blocks)):
        entry = [entry] * count if isinstance(entry, int) else list(entry)
        if len(entry) != count:
            raise ValueError(f"{name}: level {level} has {count} blocks but {len(entry)} depths {entry}")
        depths.append(entry)
    return depths


class UNetModel(nn.Cell):
    """The UNet. Sizes use sgm's parameter names; attention sits at the downsampling rates listed in
    `attention_resolutions` (1, 2, 4, ... for levels 0, 1, 2, ...).

    - Heads: `num_head_channels` channels each (SD 2.x, SDXL), or `num_heads` per layer with `num_head_channels: -1`
      (SD 1.x: 8 heads of 40/80/160 channels).
    - `use_linear_in_transformer`: linear proj_in/proj_out (SD 2.x, SDXL) or 1x1 convolutions (SD 1.x).
    - `transformer_depth`: per level, an int or one depth per input block of that level; `transformer_depth_output`
      the same for the output blocks (each level's list in output-block order), by default transformer_depth's.
      SSD-1B: [0, [2, 2], [4, 4]] and [0, [2, 1, 1], [4, 4, 10]].
    - `transformer_depth_middle`: by default the last level's; 0: no middle transformer, the middle block is one
      ResBlock (SSD-1B).
    - `num_classes: sequential`: SDXL's vector conditioning `y` through label_emb; absent: no `y` (SD 1.x/2.x)."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4),
        num_heads: int = -1,
        num_head_channels: int = 64,
        transformer_depth: Union[int, Sequence] = 1,
        transformer_depth_output: Union[int, Sequence] = None,
        transformer_depth_middle: int = None,
        context_dim: int = None,
        adm_in_channels: int = None,
        num_classes: str = None,
        dropout: float = 0.0,
        use_linear_in_transformer: bool = True,
        spatial_transformer_attn_type: str = "vanilla",
        weight_dtype: str = None,
        **unused_sgm_options,
    ):
        """`weight_dtype` ("float16"/"bfloat16"; for a frozen base, DiffusionEngine's frozen_weight_dtype): each block's
        weights go to that dtype as soon as the block is built, so that building the full-size UNet peaks at its
        fp16 size plus one block instead of its fp32 size."""
        super().__init__()
        if num_classes not in (None, "sequential"):
            raise ValueError(f"num_classes must be 'sequential' (SDXL's vector conditioning) or absent, got {num_classes!r}")
        if (num_head_channels == -1) == (num_heads == -1):
            raise ValueError(f"give one of num_heads and num_head_channels (the other -1), got num_heads={num_heads}, "
                             f"num_head_channels={num_head_channels}")
        store = (lambda block: stored_in(block, weight_dtype)) if weight_dtype else (lambda block: block)
        levels = len(channel_mult)
        num_res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        input_depths = _per_block(transformer_depth, levels, num_res_blocks, "transformer_depth")
        output_depths = _per_block(transformer_depth if transformer_depth_output is None else transformer_depth_output,
                                   levels, [n + 1 for n in num_res_blocks], "transformer_depth_output")
        if transformer_depth_middle is None:
            transformer_depth_middle = input_depths[-1][-1]
        self.model_channels = model_channels
        time_embed_dim = model_channels * 4

        def transformer(channels, depth):
            if num_head_channels == -1:
                heads, head_channels = num_heads, channels // num_heads
            else:
                heads, head_channels = channels // num_head_channels, num_head_channels
            if heads * head_channels != channels:
                raise ValueError(f"{channels} channels do not divide into heads (num_heads={num_heads}, "
                                 f"num_head_channels={num_head_channels})")
            return SpatialTransformer(channels, heads, head_channels, depth, context_dim, dropout,
                                      spatial_transformer_attn_type, use_linear=use_linear_in_transformer)

        self.time_embed = nn.SequentialCell(
            [nn.Dense(model_channels, time_embed_dim), nn.SiLU(), nn.Dense(time_embed_dim, time_embed_dim)]
        )
        self.has_label_emb = num_classes == "sequential"
        if self.has_label_emb:
            self.label_emb = nn.SequentialCell(
                [nn.SequentialCell([nn.Dense(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Dense(time_embed_dim, time_embed_dim)])]
            )

        input_blocks = [TimestepEmbedSequential([conv3x3(in_channels, model_channels)])]
        skip_channels = [model_channels]
        channels, rate = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for block in range(num_res_blocks[level]):
                layers = [ResBlock(channels, time_embed_dim, mult * model_channels, dropout)]
                channels = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(transformer(channels, input_depths[level][block]))
                input_blocks.append(store(TimestepEmbedSequential(layers)))
                skip_channels.append(channels)
            if level != levels - 1:
                input_blocks.append(TimestepEmbedSequential([Downsample(channels)]))
                skip_channels.append(channels)
                rate *= 2
        self.input_blocks = nn.CellList(input_blocks)

        middle = [ResBlock(channels, time_embed_dim, channels, dropout)]
        if transformer_depth_middle:
            middle += [transformer(channels, transformer_depth_middle), ResBlock(channels, time_embed_dim, channels, dropout)]
        self.middle_block = store(TimestepEmbedSequential(middle))

        output_blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(channels + skip_channels.pop(), time_embed_dim, model_channels * mult, dropout)]
                channels = model_channels * mult
                if rate in attention_resolutions:
                    layers.append(transformer(channels, output_depths[level][i]))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(channels))
                    rate //= 2
                output_blocks.append(store(TimestepEmbedSequential(layers)))
        self.output_blocks = nn.CellList(output_blocks)

        self.out = nn.SequentialCell([normalization(channels), nn.SiLU(), zero_module(conv3x3(model_channels, out_channels))])
        store(self)  # the rest: the embeddings, the first and last layers
        kv_start = 0
        for block in (*self.input_blocks, self.middle_block, *self.output_blocks):
            block.kv_start = kv_start
            block.kv_count = 2 * sum(isinstance(cell, CrossAttention) and cell.is_cross for _, cell in block.cells_and_names())
            kv_start += block.kv_count

    def _cross_attentions(self) -> list:
        return [cell for _, cell in self.cells_and_names() if isinstance(cell, CrossAttention) and cell.is_cross]

    def context_projections(self, context) -> tuple:
        """(k_0, v_0, k_1, v_1, ...): every cross-attention's frozen to_k/to_v products of the text `context`, without
        LoRA, in the UNet's order: its `cached_kv`. With them the UNet gives the same output while computing only the
        LoRA updates of the keys/values: for a text that stays the same over many calls (the prompts of a DreamBooth
        run, the sampling steps of one image). Run outside a graph, layer by layer; recompute when the base weights
        change (a LoRA merge)."""
        return tuple(projection for attention in self._cross_attentions() for projection in attention.project_context(context))

    def enable_gradient_checkpointing(self, res_blocks: bool = False) -> int:
        """Keep only the inputs of every transformer block (and, with `res_blocks`, every ResBlock) for the backward
        pass and recompute the rest of its forward there (Cell.recompute), as diffusers' `enable_gradient_checkpointing`:
        the activations of one block at a time instead of all of them, for one more forward of the blocks. A ResBlock
        is recomputed where every layer in it allows it (a backend's layer may define `supports_recompute()`). Returns
        the number of blocks."""
        def recomputable(block):
            return all(getattr(cell, "supports_recompute", lambda: True)() for _, cell in block.cells_and_names())

        blocks = [cell for _, cell in self.cells_and_names() if isinstance(cell, BasicTransformerBlock)
                  or (res_blocks and isinstance(cell, ResBlock) and recomputable(cell))]
        for block in blocks:
            block.recompute()
        return len(blocks)

    def construct(self, x, timesteps, context=None, y=None, cached_kv=None):
        """x: (B, C, H, W) noisy latents; timesteps: (B,); context: (B, 77, context_dim); y: (B, adm_in_channels);
        cached_kv: context_projections(context), or None."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).astype(x.dtype))
        if self.has_label_emb:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, cached_kv)
            skips.append(h)
        h = self.middle_block(h, emb, context, cached_kv)
        skip_index = len(skips) - 1  # consumed last-in first-out (an index: list.pop does not compile in GRAPH_MODE)
        for block in self.output_blocks:
            h = ops.cat((h, skips[skip_index]), axis=1)
            h = block(h, emb, context, cached_kv)
            skip_index -= 1
        return self.out(h)

"""OpenCLIP text transformer (SDXL's second text encoder ViT-bigG/14, SD 2.x's ViT-H/14), with open_clip's
parameter names.

The attribute paths reproduce open_clip's `CLIP` model with its vision tower removed, as sgm keeps
it: `positional_embedding`, `text_projection`, `logit_scale` (with a projection_dim), `transformer.resblocks.N...`,
`token_embedding`, `ln_final`. Attention uses one fused `in_proj_weight` as torch's
`nn.MultiheadAttention` does. The math equals `clip.py`'s (pre-norm blocks, causal mask);
computation is batch-first, which changes no numbers.
"""
import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from gm.modules.embedders.clip import LAYER_NORM_EPS, activation, causal_mask, causal_self_attention, check_sizes


class MultiheadAttention(nn.Cell):
    """Causal self-attention with torch's fused q/k/v projection (rows q, then k, then v)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = Parameter(initializer(Normal(width**-0.5), (3 * width, width)), name="in_proj_weight")
        self.in_proj_bias = Parameter(initializer("zeros", (3 * width,)), name="in_proj_bias")
        self.out_proj = nn.Dense(width, width)
        self.in_proj_lora = None  # a FusedQKVLoRA when text-encoder LoRA is injected (gm/modules/lora.py)

    def construct(self, x, mask):
        qkv = ops.dense(x, self.in_proj_weight.astype(x.dtype), self.in_proj_bias.astype(x.dtype))
        if self.in_proj_lora is not None:
            qkv = self.in_proj_lora(x, qkv)
        q, k, v = ops.split(qkv, qkv.shape[-1] // 3, axis=-1)
        return self.out_proj(causal_self_attention(q, k, v, self.heads, mask))


class MLP(nn.Cell):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.c_fc = nn.Dense(width, mlp_width)
        self.act = activation(act)
        self.c_proj = nn.Dense(mlp_width, width)

    def construct(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    def __init__(self, width: int, heads: int, mlp_width: int, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        self.mlp = MLP(width, mlp_width, act)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads, mlp_width, act) for _ in range(layers)])

    def construct(self, x, mask):
        """-> (input of the last block, output of the last block): sgm's 'penultimate' and 'last'."""
        for i in range(len(self.resblocks) - 1):
            x = self.resblocks[i](x, mask)
        return x, self.resblocks[len(self.resblocks) - 1](x, mask)


class OpenCLIPTextModel(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str = "gelu",
                 projection_dim: int = None, vocab_size: int = 49408, max_length: int = 77):
        super().__init__()
        check_sizes(width, heads, layers)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = Parameter(initializer(Normal(0.01), (max_length, width)), name="positional_embedding")
        self.transformer = Transformer(width, layers, heads, mlp_width, act)
        self.ln_final = nn.LayerNorm((width,), epsilon=LAYER_NORM_EPS)
        if projection_dim is not None:  # SDXL's pooled output; SD 2.x's model has neither
            self.text_projection = Parameter(initializer(Normal(width**-0.5), (width, projection_dim)), name="text_projection")
            # CLIP's contrastive temperature: unused for text encoding, kept so the checkpoint loads strictly.
            self.logit_scale = Parameter(ms.Tensor(math.log(1 / 0.07), ms.float32), name="logit_scale")
        self.causal_mask = causal_mask(max_length)

    def construct(self, input_ids):
        """(B, L) ids -> (penultimate, last) hidden states, each (B, L, width), before ln_final."""
        length = input_ids.shape[-1]
        x = self.token_embedding(input_ids)
        x = x + self.positional_embedding[:length].astype(x.dtype)
        return self.transformer(x, self.causal_mask)

    def pool(self, last, input_ids):
        """ln_final at each sequence's end-of-text token (the largest id), projected -> (B, projection_dim)."""
        eot = ops.argmax(input_ids.astype(ms.float32), dim=-1)  # ids < 2**24 are exact in fp32; first max wins
        x = ops.gather(self.ln_final(last), eot, axis=1, batch_dims=1)
        return ops.matmul(x, self.text_projection.astype(x.dtype))

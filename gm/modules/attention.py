"""Transformer parts of the SDXL UNet: attention, GEGLU feed-forward, BasicTransformerBlock and the
SpatialTransformer (linear proj_in/out), with sgm's parameter names."""
import mindspore as ms
from mindspore import nn, ops

from gm.modules import cpu_kernels
from gm.modules.diffusionmodules.util import zero_module
from gm.modules.lean_ops import GELU, SwapAxes12, gelu_derivative, softmax_backward
from gm.modules.lora import base_projection, with_lora_delta
from gm.modules.normalization import GroupNorm, LayerNorm


class ScaledDotProductAttention(nn.Cell):
    """softmax(q k^T * scale) v over (batch, heads, tokens, dim_head).

    Its backward recomputes the probabilities from q and k instead of keeping them, as flash attention does:
    they are heads x tokens^2 per sample (1.25 GiB per self-attention at the 64x64 level of a 1024x1024 image),
    q, k and v are tokens x dim. Every transpose sits inside BatchMatMul's flags (gm/modules/lean_ops.py: an
    explicit Transpose holds twice its output on MindSpore's CPU backend)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.softmax = ops.Softmax(axis=-1)
        self.matmul = ops.BatchMatMul()
        self.matmul_transposed_b = ops.BatchMatMul(transpose_b=True)
        self.matmul_transposed_a = ops.BatchMatMul(transpose_a=True)

    def construct(self, q, k, v):
        probabilities = self.softmax(self.matmul_transposed_b(q * self.scale, k))
        return self.matmul(probabilities, v)

    def bprop(self, q, k, v, out, dout):
        dout = dout.astype(v.dtype)  # under Cell.to_float the incoming gradient may keep the caller's dtype
        # Recomputed from a q that waits for dout: without the Depend, GRAPH mode merges this recomputation with the
        # forward's or runs it during the forward, and the probabilities stay alive until here (lean_ops' docstring).
        scaled_q = ops.depend(q, dout) * self.scale
        probabilities = self.softmax(self.matmul_transposed_b(scaled_q, k))
        grad_v = self.matmul_transposed_a(probabilities, dout)
        grad_scores = softmax_backward(probabilities, self.matmul_transposed_b(dout, v))
        grad_q = self.matmul(grad_scores, k) * self.scale
        grad_k = self.matmul_transposed_a(grad_scores, scaled_q)
        return grad_q, grad_k, grad_v


def _three_like_the_inputs(q, k, v, *rest):
    return q, k, v


class FusedAttention(nn.Cell):
    """softmax(q k^T * scale) v per head on (batch, tokens, heads * dim_head), forward and backward each one CPU
    kernel (gm/modules/cpu_kernels/attention.cc): no head transposes, no tokens^2 tensors between kernels; the
    backward recomputes the probabilities block by block. Needs the kernels' oneDNN part. The kernels compute in
    fp32 whatever dtype the inputs arrive in (Cell.to_float casts them to the compute dtype)."""

    def __init__(self, heads: int, scale: float):
        super().__init__()
        self.config = ms.Tensor([heads, scale], ms.float32)
        backward = cpu_kernels.kernel("AttentionBackward", _three_like_the_inputs, _three_like_the_inputs)

        def attention_bprop(q, k, v, config, out, dout):
            dq, dk, dv = backward(q, k, v, dout, config)
            return dq, dk, dv, ops.zeros_like(config)

        self.forward = cpu_kernels.kernel("AttentionForward", cpu_kernels.same_as_first, cpu_kernels.same_as_first,
                                          bprop=attention_bprop)

    def construct(self, q, k, v):
        out = self.forward(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), self.config)
        return out.astype(q.dtype)


class CrossAttention(nn.Cell):
    """Multi-head attention; self-attention when `context` is None (attn1), cross-attention on the
    text context otherwise (attn2). to_q/to_k/to_v have no bias, as in SDXL. `fused` (default:
    cpu_kernels.onednn_enabled()) computes the attention in the CPU kernels of FusedAttention.

    A cross-attention's context may also come as (text, projections): `projections` holds the frozen to_k/to_v
    products of `text` of every cross-attention of the UNet (UNetModel.context_projections), this one's at
    2 * context_index; only the LoRA updates of to_k/to_v are then computed here. The text of a DreamBooth run
    or of a sampling call does not change between steps, so those products need computing once."""

    def __init__(self, query_dim: int, context_dim: int = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 fused=None):
        super().__init__()
        inner_dim = heads * dim_head
        self.is_cross = context_dim is not None  # attends to a text context (attn2)
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.scale = heads, dim_head**-0.5
        self.fused = cpu_kernels.onednn_enabled() if fused is None else fused
        self.attention = FusedAttention(heads, self.scale) if self.fused else ScaledDotProductAttention(self.scale)
        self.to_q = nn.Dense(query_dim, inner_dim, has_bias=False)
        self.to_k = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_v = nn.Dense(context_dim, inner_dim, has_bias=False)
        self.to_out = nn.SequentialCell([nn.Dense(inner_dim, query_dim), nn.Dropout(p=dropout)])
        self.swap_axes = SwapAxes12()  # (batch, tokens, heads, dim) <-> (batch, heads, tokens, dim)
        self.context_index = None  # set by UNetModel: where this layer's keys/values are in context_projections

    def add_flags(self, **flags):
        if self.fused and cpu_kernels.lowers_precision(flags):  # the kernels are fp32-only
            self.fused = False
            self.attention = ScaledDotProductAttention(self.scale)
        return super().add_flags(**flags)

    def _split_heads(self, x):
        batch, tokens, _ = x.shape
        return self.swap_axes(x.reshape(batch, tokens, self.heads, -1))

    def project_context(self, text):
        """The frozen parts of to_k and to_v applied to `text` (no LoRA)."""
        return base_projection(self.to_k, text), base_projection(self.to_v, text)

    def construct(self, x, context=None):
        if isinstance(context, tuple):  # (text, UNetModel.context_projections(text))
            text, projections = context
            q = self.to_q(x)
            k = with_lora_delta(self.to_k, projections[2 * self.context_index].astype(q.dtype), text)
            v = with_lora_delta(self.to_v, projections[2 * self.context_index + 1].astype(q.dtype), text)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # In fp32 whatever the compute dtype: fp16 softmax over 4096 tokens overflows.
        if self.fused:
            return self.to_out(self.attention(q, k, v).astype(v.dtype))
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        out = self.attention(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32)).astype(v.dtype)
        batch, _, tokens, _ = out.shape
        out = self.swap_axes(out).reshape(batch, tokens, -1)
        return self.to_out(out)


def _half_last_axis(x):
    return [*x[:-1], x[-1] // 2]


class GatedGELU(nn.Cell):
    """value * gelu(gate) over the two halves of the last axis. Its backward keeps only the input and recomputes
    both halves and gelu(gate) from it; autodiff would keep the two halves and gelu(gate), half as much again (torch
    keeps as much). `fused` (default: cpu_kernels.enabled()) computes each pass in one CPU kernel, whose backward
    is the primitive's own, so that Cell.recompute of the enclosing block (gradient checkpointing) recomputes the
    input too; a Cell bprop reads the forward's. Otherwise HandWrittenGatedGELU."""

    def __init__(self, fused=None):
        super().__init__()
        self.fused = cpu_kernels.enabled() if fused is None else fused
        self.hand_written = HandWrittenGatedGELU()
        if self.fused:
            self.forward_kernel = cpu_kernels.kernel_with_backward("GatedGeluForward", "GatedGeluBackward", _half_last_axis)

    def construct(self, x):
        if self.fused and x.dtype == ms.float32:
            return self.forward_kernel(x)
        return self.hand_written(x)


class HandWrittenGatedGELU(nn.Cell):
    """GatedGELU from MindSpore's ops, with a backward that recomputes from x after dout exists (lean_ops'
    docstring: why the input waits for dout)."""

    def __init__(self):
        super().__init__()
        self.gelu = GELU()
        self.halves = ops.Split(axis=-1, output_num=2)  # the primitive: ops.split/ops.chunk fail to parse in a bprop

    def construct(self, x):
        value, gate = self.halves(x)
        return value * self.gelu(gate)

    def bprop(self, x, out, dout):
        dout = dout.astype(x.dtype)
        value, gate = self.halves(ops.depend(x, dout))
        grad_value = dout * self.gelu(gate)
        grad_gate = dout * value * gelu_derivative(gate)
        return (ops.cat((grad_value, grad_gate), axis=-1),)


class GEGLU(nn.Cell):
    """Gated GELU: one projection gives the value and its gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out * 2)
        self.gated_gelu = GatedGELU()

    def construct(self, x):
        return self.gated_gelu(self.proj(x))


class FeedForward(nn.Cell):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner_dim), nn.Dropout(p=dropout), nn.Dense(inner_dim, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = LayerNorm((dim,), epsilon=1e-5)
        self.norm2 = LayerNorm((dim,), epsilon=1e-5)
        self.norm3 = LayerNorm((dim,), epsilon=1e-5)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Cell):
    """GroupNorm, linear proj_in over the flattened pixels, `depth` transformer blocks, proj_out, residual."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Dense(in_channels, inner_dim)
        self.transformer_blocks = nn.CellList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim, dropout) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Dense(inner_dim, in_channels))
        self.swap_axes = SwapAxes12()  # (batch, channels, pixels) <-> (batch, pixels, channels)

    def construct(self, x, context):
        batch, channels, height, width = x.shape
        x_in = x
        x = self.swap_axes(self.norm(x).reshape(batch, channels, height * width))
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        return self.swap_axes(x).reshape(batch, channels, height, width) + x_in

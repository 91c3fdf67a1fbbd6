"""Benchmark: MindBooth's CPU attention kernels (gm.backends.cpu.attention.FusedAttention: the flash forward and the
blocked backward of gm/backends/cpu/kernels/attention.cc) against torch's scaled_dot_product_attention.

    python benchmarks/bench_attention.py
    python benchmarks/bench_attention.py --repeats 5

SDXL UNet's attention shapes, batch 2 (CFG's two halves, or instance + class), dim_head 64, on the projections'
layout (batch, tokens, heads * 64): the self-attention of the 64x64 and 32x32 latent levels (4096 and 1024 tokens
at 1024x1024; 1024 and 256 at 512x512) and a cross-attention on the 77 text tokens. Forward, and forward +
backward (q, k, v gradients, what a LoRA step needs). MindSpore in GRAPH mode, torch eager; median of `--repeats`
runs after a warm-up. Prints `RESULT {json}` per shape, with our output's and gradients' largest difference from
torch's, relative to torch's largest value, and GFLOP/s of the forward (4 * batch * heads * queries * keys * 64)."""
import argparse
import json
import sys

import numpy as np

from common import median_seconds  # importing common also puts the repository root on sys.path
from mindbooth.allocator import preload_mimalloc
from mindbooth.config import add_allocator_flag

DIM_HEAD = 64
# (queries, keys, heads, where)
SHAPES = [(4096, 4096, 10, "1024x1024, 64x64 level"), (1024, 1024, 20, "1024x1024, 32x32 level"),
          (1024, 1024, 10, "512x512, 32x32 level"), (256, 256, 20, "512x512, 16x16 level"),
          (4096, 77, 10, "1024x1024, cross-attention")]


def mindbooth_attention(q, k, v, dout, heads):
    import mindspore as ms
    from mindspore import nn, ops

    from gm.backends.cpu.attention import FusedAttention
    from gm.modules.attention import VanillaAttention
    from gm.util import become

    def fused_attention():
        attention = become(VanillaAttention(heads, DIM_HEAD**-0.5), FusedAttention)
        attention.init_kernels()
        return attention

    class WithGradients(nn.Cell):
        def __init__(self):
            super().__init__()
            self.attention = fused_attention()

        def construct(self, q, k, v, dout):
            return ops.GradOperation(get_all=True, sens_param=True)(self.attention)(q, k, v, dout)

    attention, with_gradients = fused_attention(), WithGradients()
    tensors = [ms.Tensor(a) for a in (q, k, v, dout)]
    return (lambda: attention(*tensors[:3]).asnumpy(),
            lambda: [g.asnumpy() for g in with_gradients(*tensors)])


def torch_attention(q, k, v, dout, heads):
    import torch
    import torch.nn.functional as F

    def split(a):  # (batch, tokens, heads * d) -> (batch, heads, tokens, d)
        return torch.from_numpy(a).reshape(a.shape[0], a.shape[1], heads, DIM_HEAD).transpose(1, 2)

    def forward(requires_grad=False):
        inputs = [split(a).detach().requires_grad_(requires_grad) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*inputs).transpose(1, 2).reshape(q.shape)
        return inputs, out

    def forward_backward():
        inputs, out = forward(True)
        out.backward(torch.from_numpy(dout))
        return [t.grad.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1).numpy() for t in inputs]

    def forward_only():
        with torch.no_grad():
            return forward()[1].numpy()

    return forward_only, forward_backward


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    add_allocator_flag(p.add_argument)
    args = p.parse_args()
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    rng = np.random.default_rng(0)
    for queries, keys, heads, where in SHAPES:
        q, dout = (rng.standard_normal((2, queries, heads * DIM_HEAD)).astype(np.float32) for _ in range(2))
        k, v = (rng.standard_normal((2, keys, heads * DIM_HEAD)).astype(np.float32) for _ in range(2))
        gflop = 4 * 2 * heads * queries * keys * DIM_HEAD / 1e9
        result = {"queries": queries, "keys": keys, "heads": heads, "batch": 2, "where": where, "gflop_forward": gflop}
        outputs = {}
        for impl, build in (("mindbooth", mindbooth_attention), ("torch", torch_attention)):
            forward, forward_backward = build(q, k, v, dout, heads)
            result[f"{impl}_forward_s"] = round(median_seconds(forward, args.repeats), 4)
            result[f"{impl}_forward_backward_s"] = round(median_seconds(forward_backward, args.repeats), 4)
            result[f"{impl}_forward_gflops"] = round(gflop / result[f"{impl}_forward_s"], 1)
            outputs[impl] = [forward(), *forward_backward()]
        for what in ("forward", "forward_backward"):
            result[f"{what}_vs_torch"] = round(result[f"mindbooth_{what}_s"] / result[f"torch_{what}_s"], 2)
        for i, what in enumerate(("output", "grad_q", "grad_k", "grad_v")):
            ours, ref = outputs["mindbooth"][i], outputs["torch"][i]
            result[f"{what}_relative_difference"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    preload_mimalloc([*sys.argv[1:], "--device_target", "CPU"])  # as MindBooth runs on the CPU
    main()

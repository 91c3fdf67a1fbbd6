"""Benchmark: seconds and cores used per call of the ops a MindBooth train step spends its non-MatMul time in,
MindSpore GRAPH mode against torch on the same shapes (the 512 step's shapes, batch 2).

    python benchmarks/bench_op_cores.py

Each op is called CHAIN times, on as many copies of its inputs, inside one GRAPH-mode Cell (torch: a Python loop), run once to
warm up and then REPEATS times; reported per call: the median wall seconds, and the process's CPU seconds over the
wall seconds ("cores": 2 = both cores busy). An op at about 1 core on this 2-core machine runs single-threaded.
Prints a Markdown table and one `RESULT {json}` line."""
import argparse
import statistics
import time

import numpy as np

import common

CHAIN, REPEATS = 8, 3


def cases():
    """name -> (input arrays, MindSpore fn, torch fn); the shapes are those of the 512 train step at batch 2.
    The MindSpore fns are defs: GRAPH mode cannot parse lambdas."""
    import mindspore as ms
    import torch
    import torch.nn.functional as F
    from mindspore import ops

    rng = np.random.default_rng(0)
    matmul_transposed_b = ops.MatMul(transpose_b=True)
    fold_size = ms.Tensor([32, 32], ms.int32)

    def randn(*shape, dtype=np.float32):
        return rng.standard_normal(shape).astype(dtype)

    def cast(w):
        return ops.cast(w, ms.float32)

    def broadcast(w):
        return ops.broadcast_to(w, (2,) + w.shape)

    def concat_copies(w):  # the same (2, ...) tensor as broadcast, by Concat
        return ops.cat((w.expand_dims(0), w.expand_dims(0)))

    def tile(w):
        return ops.tile(w.expand_dims(0), (2, 1, 1))

    def im2col(x):
        return ops.unfold(x, kernel_size=3, padding=1)

    def col2im(columns):
        return ops.fold(columns, fold_size, 3, padding=1)

    def softmax(x):
        return ops.softmax(x, -1)

    def row_sum(x):
        return x.sum(-1, keepdims=True)

    def mul(a, b):
        return a * b

    def erf(x):
        return ops.erf(x)

    def sigmoid(x):
        return ops.sigmoid(x)

    def group_norm(x, gamma, beta):
        return ops.group_norm(x, 32, gamma, beta, 1e-5)

    layer_norm_op = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)  # nn.LayerNorm's kernel

    def layer_norm(x, gamma, beta):
        return layer_norm_op(x, gamma, beta)[0]

    def matmul(x, w):
        return matmul_transposed_b(x, w)

    # MindBooth's fused CPU kernels (gm/backends/cpu/kernels), forward, on the same shapes
    from mindspore import mint

    from gm.backends.cpu import kernels as cpu_kernels
    from gm.backends.cpu.lean_ops import SQRT_HALF

    group_norm_config, layer_norm_config = ms.Tensor([32, 1e-5], ms.float32), ms.Tensor([1e-5], ms.float32)
    same = cpu_kernels.same_as_first
    cast_kernel = cpu_kernels.kernel("CastFloat16ToFloat32", same, lambda *dtypes: ms.float32)
    group_norm_kernel = cpu_kernels.kernel("GroupNormForward", same, same)
    layer_norm_kernel = cpu_kernels.kernel("LayerNormForward", same, same)
    gated_gelu_kernel = cpu_kernels.kernel("GatedGeluForward", lambda shape: [*shape[:-1], shape[-1] // 2], same)
    swap_kernel = cpu_kernels.kernel("SwapAxes12", lambda shape: [shape[0], shape[2], shape[1], *shape[3:]], same)
    halves = ops.Split(axis=-1, output_num=2)

    def cast_fused(w):
        return cast_kernel(w, w)  # the second input only orders the cast (gm/backends/cpu/weight_cast.py)

    def group_norm_fused(x, gamma, beta):
        return group_norm_kernel(x, gamma, beta, group_norm_config)

    def layer_norm_fused(x, gamma, beta):
        return layer_norm_kernel(x, gamma, beta, layer_norm_config)

    def gated_gelu(x):  # GatedGELU's MindSpore ops (lean_ops.LeanGELU's forward)
        value, gate = halves(x)
        return value * (0.5 * gate * (1.0 + ops.erf(gate * SQRT_HALF)))

    def gated_gelu_fused(x):
        return gated_gelu_kernel(x)

    def swap_view(x):  # a consumer makes mint.transpose's view contiguous; here the Mul
        return mint.transpose(x, 1, 2) * 1.0

    def swap_fused(x):
        return swap_kernel(x)

    def torch_gated_gelu(x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)

    scores = (2, 10, 1024, 1024)  # the 32x32 level's self-attention: batch, heads, tokens, tokens
    return {
        "cast fp16->fp32 (10240, 1280)": ([randn(10240, 1280, dtype=np.float16)], cast, lambda w: w.float()),
        "broadcast to batch 2 (1280, 11520)": ([randn(1280, 11520)], broadcast,
                                               lambda w: w.expand(2, *w.shape).contiguous()),
        "concat 2 copies (1280, 11520)": ([randn(1280, 11520)], concat_copies, lambda w: torch.cat((w[None], w[None]))),
        "tile to batch 2 (1280, 11520)": ([randn(1280, 11520)], tile, lambda w: w[None].repeat(2, 1, 1)),
        "im2col 3x3 (2, 640, 32, 32)": ([randn(2, 640, 32, 32)], im2col, lambda x: F.unfold(x, 3, padding=1)),
        "col2im 3x3 (2, 5760, 1024)": ([randn(2, 640 * 9, 1024)], col2im, lambda c: F.fold(c, (32, 32), 3, padding=1)),
        "softmax (2, 10, 1024, 1024)": ([randn(*scores)], softmax, lambda x: torch.softmax(x, -1)),
        "row sum (2, 10, 1024, 1024)": ([randn(*scores)], row_sum, lambda x: x.sum(-1, keepdim=True)),
        "mul (2, 10, 1024, 1024)": ([randn(*scores), randn(*scores)], mul, lambda a, b: a * b),
        "erf (2, 1024, 2560)": ([randn(2, 1024, 2560)], erf, torch.erf),
        "sigmoid (2, 640, 32, 32)": ([randn(2, 640, 32, 32)], sigmoid, torch.sigmoid),
        "group norm (2, 640, 32, 32)": ([randn(2, 640, 32, 32), randn(640), randn(640)], group_norm,
                                        lambda x, g, b: F.group_norm(x, 32, g, b, 1e-5)),
        "layer norm (2, 1024, 640)": ([randn(2, 1024, 640), randn(640), randn(640)], layer_norm,
                                      lambda x, g, b: F.layer_norm(x, (640,), g, b, 1e-5)),
        "matmul (2048, 1280) x (1280, 10240)": ([randn(2048, 1280), randn(10240, 1280)], matmul, lambda x, w: x @ w.T),
        "cast fp16->fp32 (10240, 1280), MindBooth kernel": ([randn(10240, 1280, dtype=np.float16)], cast_fused,
                                                            lambda w: w.float()),
        "group norm (2, 640, 32, 32), MindBooth kernel": ([randn(2, 640, 32, 32), randn(640), randn(640)],
                                                          group_norm_fused,
                                                          lambda x, g, b: F.group_norm(x, 32, g, b, 1e-5)),
        "layer norm (2, 1024, 640), MindBooth kernel": ([randn(2, 1024, 640), randn(640), randn(640)], layer_norm_fused,
                                                        lambda x, g, b: F.layer_norm(x, (640,), g, b, 1e-5)),
        "GEGLU gating (2, 1024, 2 x 2560), MindSpore ops": ([randn(2, 1024, 5120)], gated_gelu, torch_gated_gelu),
        "GEGLU gating (2, 1024, 2 x 2560), MindBooth kernel": ([randn(2, 1024, 5120)], gated_gelu_fused,
                                                               torch_gated_gelu),
        "swap axes 1, 2 (2, 1024, 10, 64), mint view * 1": ([randn(2, 1024, 10, 64)], swap_view,
                                                            lambda x: x.transpose(1, 2).contiguous()),
        "swap axes 1, 2 (2, 1024, 10, 64), MindBooth kernel": ([randn(2, 1024, 10, 64)], swap_fused,
                                                               lambda x: x.transpose(1, 2).contiguous()),
    }


def time_calls(run, finish):
    """Median wall seconds and CPU seconds per wall second of REPEATS runs of CHAIN calls, after one warm-up."""
    run()
    finish()
    walls, cores = [], []
    for _ in range(REPEATS):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        finish()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        walls.append(wall / CHAIN)
        cores.append(cpu / wall)
    return statistics.median(walls), statistics.median(cores)


def measure_mindspore(name, arrays, fn):
    import mindspore as ms
    from mindspore import nn

    arity = len(arrays)

    class Chain(nn.Cell):  # CHAIN calls on CHAIN copies of the inputs (equal calls would be merged), all returned
        def construct(self, *inputs):
            outputs = ()
            for i in range(CHAIN):
                outputs = outputs + (fn(*inputs[i * arity:(i + 1) * arity]),)
            return outputs

    chain, inputs = Chain(), [ms.Tensor(a.copy()) for _ in range(CHAIN) for a in arrays]
    state = {}

    def run():
        state["out"] = chain(*inputs)

    return time_calls(run, lambda: state["out"][-1].asnumpy())


def measure_torch(name, arrays, fn):
    import torch

    inputs = [torch.from_numpy(a) for a in arrays]
    with torch.no_grad():
        return time_calls(lambda: [fn(*inputs) for _ in range(CHAIN)], lambda: None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args()
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    rows = []
    print("| op | MindSpore GRAPH ms | cores | torch ms | cores | MindSpore / torch |\n| --- | --- | --- | --- | --- | --- |")
    for name, (arrays, ms_fn, torch_fn) in cases().items():
        ms_s, ms_cores = measure_mindspore(name, arrays, ms_fn)
        torch_s, torch_cores = measure_torch(name, arrays, torch_fn)
        rows.append(dict(op=name, mindspore_ms=round(ms_s * 1e3, 2), mindspore_cores=round(ms_cores, 2),
                         torch_ms=round(torch_s * 1e3, 2), torch_cores=round(torch_cores, 2)))
        print(f"| {name} | {ms_s * 1e3:.2f} | {ms_cores:.2f} | {torch_s * 1e3:.2f} | {torch_cores:.2f} | "
              f"{ms_s / torch_s:.2f}x |", flush=True)
    common.emit(dict(benchmark="op_cores", chain=CHAIN, repeats=REPEATS, rows=rows, machine=common.machine(),
                     versions=common.versions("mindspore")))


if __name__ == "__main__":
    main()

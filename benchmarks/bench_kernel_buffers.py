"""Benchmark: memory that MindSpore's CPU kernels hold per op in GRAPH mode, and the replacements in gm/backends/cpu/lean_ops.py.

    python benchmarks/bench_kernel_buffers.py                 # every case, each in its own process
    python benchmarks/bench_kernel_buffers.py --cases gelu gelu_lean --train

One GRAPH-mode Cell chains the same op 16 times on a 64 MiB fp32 tensor (16384 x 1024) and runs twice
(with --train: the gradient of the sum). Reported: RSS growth over the process before the first run, and the
seconds of the second run. The memory pool reuses its blocks (MS_DEV_RUNTIME_CONF=memory_statistics:True
reports a peak of a few tensors), so growth far above a few hundred MiB is held outside it, per op of the graph.
Prints one `RESULT {json}` line per case."""
import argparse
import json
import subprocess
import sys
import time

import numpy as np

import common

ROWS, COLUMNS, CHAIN = 16384, 1024, 16
SHAPE_4D = (16, ROWS // 16, 16, COLUMNS // 16)  # (batch, tokens, heads, dim_head): the attention head split


def _cases():
    """name -> fn(x, row, column), the op chained; module-level defs because GRAPH mode cannot parse lambdas."""
    from mindspore import nn, ops

    from gm.backends.cpu.lean_ops import LeanGELU, add_broadcast, softmax_backward, swap_axes

    class LeanSoftmax(nn.Cell):  # ops.softmax forward, lean_ops.softmax_backward backward
        def construct(self, x):
            return ops.softmax(x, -1)

        def bprop(self, x, out, dout):
            return (softmax_backward(out, dout),)

    gelu, lean_softmax = LeanGELU(), LeanSoftmax()

    def mul_scalar(x, row, column):
        return x * 0.5

    def add_row(x, row, column):
        return x + row

    def add_row_lean(x, row, column):
        return add_broadcast(x, row)

    def bias_add(x, row, column):
        return ops.bias_add(x, row)

    def sub_column(x, row, column):
        return x - column

    def sub_column_lean(x, row, column):
        return x - ops.broadcast_to(column, x.shape)

    def mul_column(x, row, column):
        return x * column

    def gelu_native(x, row, column):
        return ops.gelu(x, approximate="none")

    def gelu_lean(x, row, column):
        return gelu(x)

    def softmax(x, row, column):
        return ops.softmax(x, -1)

    def softmax_lean(x, row, column):
        return lean_softmax(x)

    def transpose(x, row, column):
        return x.reshape(SHAPE_4D).transpose(0, 2, 1, 3).reshape(ROWS, COLUMNS)

    def transpose_lean(x, row, column):
        return swap_axes(x.reshape(SHAPE_4D), 1, 2).reshape(ROWS, COLUMNS)

    def split_stack(x, row, column):  # a per-sample loop's split and re-join (tried for the convs, section 11)
        return ops.stack(ops.Split(0, 2)(x.reshape(2, ROWS // 2, COLUMNS))).reshape(ROWS, COLUMNS)

    def split_concat(x, row, column):
        return ops.cat(ops.Split(0, 2)(x), 0)

    def slice_concat(x, row, column):
        return ops.cat((x[:ROWS // 2], x[ROWS // 2:]), 0)

    return dict(mul_scalar=mul_scalar, add_row=add_row, add_row_lean=add_row_lean, bias_add=bias_add,
                sub_column=sub_column, sub_column_lean=sub_column_lean, mul_column=mul_column, gelu=gelu_native,
                gelu_lean=gelu_lean, softmax=softmax, softmax_lean=softmax_lean, transpose=transpose,
                transpose_lean=transpose_lean, split_stack=split_stack, split_concat=split_concat,
                slice_concat=slice_concat)


def measure(case: str, train: bool) -> dict:
    import mindspore as ms
    from mindspore import nn, ops

    op = _cases()[case]

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)

    class Chain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.row = ms.Tensor(np.full((COLUMNS,), 0.5, np.float32))
            self.column = ms.Tensor(np.full((ROWS, 1), 0.5, np.float32))

        def construct(self, x):
            for _ in range(CHAIN):
                x = op(x, self.row, self.column)
            return x.sum()

    chain = Chain()

    class Gradient(nn.Cell):
        def __init__(self):
            super().__init__()
            self.grad = ops.GradOperation()

        def construct(self, x):
            return self.grad(chain)(x)

    run = Gradient() if train else chain
    x = ms.Tensor(np.random.default_rng(0).random((ROWS, COLUMNS), np.float32))
    before = common.rss_gib()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        run(x).asnumpy()
        seconds.append(time.perf_counter() - start)
    return dict(case=case, train=train, ops=CHAIN, tensor_mib=ROWS * COLUMNS * 4 / 2**20,
                rss_growth_gib=round(common.rss_gib() - before, 2), second_run_s=round(seconds[1], 3))


CASES = ["mul_scalar", "add_row", "add_row_lean", "bias_add", "sub_column", "sub_column_lean", "mul_column",
         "gelu", "gelu_lean", "softmax", "softmax_lean", "transpose", "transpose_lean", "split_stack", "split_concat",
         "slice_concat"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    p.add_argument("--train", action="store_true", help="run the gradient of the chain")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.cases[0], args.train)), flush=True)
        return
    for case in args.cases:  # one process per case: the buffers live as long as the process's graphs
        argv = [sys.executable, __file__, "--cases", case, "--child"] + (["--train"] if args.train else [])
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        print(next(line for line in out.splitlines() if line.startswith("RESULT ")), flush=True)


if __name__ == "__main__":
    main()

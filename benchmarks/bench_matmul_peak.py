"""Benchmark: the measured fp32 matmul peak of this CPU (the ceiling for the train step's FLOP/s).

    python benchmarks/bench_matmul_peak.py

Square fp32 matmuls (2*n^3 FLOPs each) in torch (oneDNN/MKL), numpy (OpenBLAS) and MindSpore, best of several
repeats per size; the highest rate over all is the peak. MindSpore is measured two ways: one `ops.matmul` call in
PyNative mode (`mindspore_pynative_n`), and a GRAPH-mode Cell that chains CHAIN MatMuls (`mindspore_graph_n`, the
rate per MatMul), which is how the compiled train and sampling steps run them. The PyNative figure is about half
the GRAPH one on this machine, so it is not MindSpore's MatMul peak.
Prints one `RESULT {json}` line."""
import argparse
import time

import numpy as np

import common


CHAIN = 8


def best_rate(fn, n, repeats, matmuls=1):
    fn()  # warm-up (and the compile, in GRAPH mode)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return matmuls * 2 * n**3 / best / 1e9


def mindspore_chain():
    """A Cell of CHAIN dependent MatMuls, x <- (x @ w) * scale (the scale keeps the values finite)."""
    from mindspore import nn, ops

    class Chain(nn.Cell):
        def __init__(self):
            super().__init__()
            self.matmul = ops.MatMul()

        def construct(self, x, w):
            for _ in range(CHAIN):
                x = self.matmul(x, w) * 0.01
            return x

    return Chain()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rates = {}
    rng = np.random.default_rng(0)
    import torch

    operands = {n: [rng.standard_normal((n, n)).astype(np.float32) for _ in range(2)] for n in args.sizes}
    for n, (a, b) in operands.items():
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates[f"torch_{n}"] = best_rate(lambda: torch.mm(ta, tb), n, args.repeats)
        rates[f"numpy_{n}"] = best_rate(lambda: a @ b, n, args.repeats)
    import mindspore as ms

    ms.set_device("CPU")
    ms_operands = {n: [ms.Tensor(m) for m in pair] for n, pair in operands.items()}
    for n, (a, b) in ms_operands.items():
        rates[f"mindspore_pynative_{n}"] = best_rate(lambda: ms.ops.matmul(a, b).asnumpy(), n, args.repeats)
    ms.set_context(mode=ms.GRAPH_MODE)
    chain = mindspore_chain()
    for n, (a, b) in ms_operands.items():
        rates[f"mindspore_graph_{n}"] = best_rate(lambda: chain(a, b).asnumpy(), n, args.repeats, matmuls=CHAIN)
    rates = {k: round(v, 1) for k, v in rates.items()}
    versions = common.versions("torch")
    versions["mindspore"] = ms.__version__
    common.emit(dict(benchmark="matmul_peak", gflops=rates, peak_gflops=max(rates.values()),
                     peak_from=max(rates, key=rates.get), torch_threads=torch.get_num_threads(),
                     loadavg=[round(x, 2) for x in __import__("os").getloadavg()],
                     versions=versions, machine=common.machine(),
                     command="python benchmarks/bench_matmul_peak.py"))


if __name__ == "__main__":
    main()

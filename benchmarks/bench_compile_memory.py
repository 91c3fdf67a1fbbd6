"""Benchmark: RSS that a compiled GRAPH_MODE graph holds per op, and per parameter of the optimizer step.

    python benchmarks/bench_compile_memory.py [--allocator mimalloc|system]

Two measurements, each size in a fresh process, RSS from /proc before and after the first call (compile + run):
- chain: N chained `x * 0.999` on a 16x16 tensor (so the data is nothing): the slope between two N is the memory
  one more op of a compiled graph holds, whatever its tensors' size.
- optimizer: mindbooth's ApplyStep (average, clip, AdamW, clear) over N LoRA-shaped parameters (640x4 / 4x640):
  the slope per parameter. The full SDXL UNet's LoRA has 1120 parameters (rank 4 on attn1/attn2 to_q/k/v/out).
"""
import json
import subprocess
import sys
import time

import common

SIZES = {"chain": (50, 250), "optimizer": (112, 448)}
UNIT = {"chain": "op", "optimizer": "parameter"}
FULL_SDXL_LORA_PARAMETERS = 1120


def measure(case: str, n: int, allocator: str) -> dict:
    """One size in a fresh process (this script with --child): a GRAPH_MODE Cell must be defined in a file."""
    out = subprocess.run([sys.executable, __file__, "--child", case, str(n)], capture_output=True, text=True,
                         check=True, env=common.allocator_env(allocator))
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(case: str, n: int):
    import numpy as np
    import mindspore as ms
    from mindspore import nn

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    if case == "chain":
        class Chain(nn.Cell):
            def construct(self, x):
                for _ in range(n):
                    x = x * 0.999
                return x

        net, args = Chain(), (ms.Tensor(np.ones((16, 16), np.float32)),)
    else:
        from mindbooth.optim import AdamW
        from mindbooth.train_step import ApplyStep, make_buffers

        params = [ms.Parameter(ms.Tensor(np.full((4, 640) if i % 2 else (640, 4), 0.01, np.float32)), name=f"p{i}")
                  for i in range(n)]
        net, args = ApplyStep(make_buffers(params), AdamW(params, learning_rate=1e-4), 1, True, 1.0), ()
    before = common.rss_gib()
    start = time.perf_counter()
    net(*args)
    print(json.dumps({"case": case, "n": n, "growth_gib": common.rss_gib() - before,
                      "first_call_s": time.perf_counter() - start}))


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--allocator", choices=common.ALLOCATORS, default="mimalloc")
    args = p.parse_args()
    results = {"allocator": args.allocator}
    for case, (small, large) in SIZES.items():
        a, b = measure(case, small, args.allocator), measure(case, large, args.allocator)
        slope_kib = (b["growth_gib"] - a["growth_gib"]) * 2**20 / (large - small)
        results[case] = {"sizes": [a, b], f"kib_per_{UNIT[case]}": round(slope_kib, 1)}
        print(f"{case}: +{a['growth_gib']:.3f} GiB at {small}, +{b['growth_gib']:.3f} GiB at {large} "
              f"-> {slope_kib:.0f} KiB per {UNIT[case]}", flush=True)
    per_param = results["optimizer"]["kib_per_parameter"]
    results["optimizer"]["full_sdxl_lora_gib"] = round(per_param * FULL_SDXL_LORA_PARAMETERS / 2**20, 2)
    print(f"optimizer step of the full SDXL LoRA ({FULL_SDXL_LORA_PARAMETERS} parameters): "
          f"~{results['optimizer']['full_sdxl_lora_gib']} GiB held by its compiled graph")
    common.emit({"benchmark": "compile_memory", **results, "machine": common.machine(),
                 "versions": common.versions("mindspore")})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()

"""Benchmark: converting a full-size SDXL base file vs copying it with `cp`, and peak memory.

    python benchmarks/bench_convert.py --keys ../shared/reference/sdxl_keys/mindone/model_conversion/torch_key_base.yaml
    python benchmarks/bench_convert.py --input sd_xl_base_1.0.safetensors     # the real file, if you have it

Without --input it writes a random fp16 official-layout file (6.9 GB) from the key list into --workdir
first. Every step runs as its own process, timed from outside; peak RSS is read with wait4(), so it
covers the step's whole process tree (the converter builds the model's name list in a child).
Steps: cp of the input; pt_to_ms fp32 (the default) and fp16; ms_to_pt fp16 (back to the original,
checked bit-identical). All files are warm in the page cache, cp included. Needs ~28 GB free in --workdir.
"""
import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "model_conversion" / "convert_weight.py"
MAKE = ROOT / "tools" / "model_conversion" / "make_random_sdxl.py"


def timed(cmd):
    """(seconds, peak RSS in GiB of the process tree, stdout) of one command."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of the child and its waited-for descendants
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(f"failed: {' '.join(map(str, cmd))}\n{err.read()}")
        return seconds, usage.ru_maxrss / 2**20, out.read()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an existing official-layout SDXL base .safetensors")
    source.add_argument("--keys", help="key list to build a random full-size file from (torch_key_base.yaml)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the large files go (removed after)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    py = sys.executable
    rows = []
    try:
        src = Path(args.input) if args.input else work / "sdxl_random.safetensors"
        if not args.input:
            seconds, rss, _ = timed([py, str(MAKE), "--keys", args.keys, "--out", str(src)])
            print(f"wrote random input in {seconds:.1f} s")
        size = src.stat().st_size / 2**30
        with open(src, "rb") as f:  # warm the page cache for every step alike
            while f.read(64 << 20):
                pass

        seconds, rss, _ = timed(["cp", str(src), str(work / "copy.safetensors")])
        rows.append(("cp (same file)", seconds, rss, size))
        (work / "copy.safetensors").unlink()

        ckpt16 = work / "sdxl_fp16.ckpt"
        seconds, rss, out = timed([py, str(CLI), "--task", "pt_to_ms", "--weight_safetensors", str(src),
                                   "--weight_ms", str(ckpt16), "--dtype", "fp16", "--no_progress"])
        rows.append(("pt_to_ms --dtype fp16", seconds, rss, ckpt16.stat().st_size / 2**30, out.strip()))

        back = work / "back.safetensors"
        seconds, rss, out = timed([py, str(CLI), "--task", "ms_to_pt", "--weight_ms", str(ckpt16),
                                   "--weight_safetensors", str(back), "--dtype", "fp16", "--no_progress"])
        identical = filecmp.cmp(src, back, shallow=False)
        rows.append(("ms_to_pt --dtype fp16", seconds, rss, back.stat().st_size / 2**30, out.strip()))
        back.unlink()
        ckpt16.unlink()

        ckpt32 = work / "sdxl_fp32.ckpt"
        seconds, rss, out = timed([py, str(CLI), "--task", "pt_to_ms", "--weight_safetensors", str(src),
                                   "--weight_ms", str(ckpt32), "--no_progress"])
        rows.append(("pt_to_ms (fp32, default)", seconds, rss, ckpt32.stat().st_size / 2**30, out.strip()))
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    print(f"\ninput: {src.name if args.input else 'random fp16, official layout'}, {size:.2f} GiB; "
          f"{os.cpu_count()} CPUs")
    print(f"{'step':28s} {'wall s':>7s} {'x cp':>6s} {'peak RSS GiB':>13s} {'output GiB':>11s}")
    cp_seconds = rows[0][1]
    for row in rows:
        name, seconds, rss, out_size = row[:4]
        print(f"{name:28s} {seconds:7.1f} {seconds / cp_seconds:6.2f} {rss:13.2f} {out_size:11.2f}")
    print(f"round trip safetensors -> ckpt -> safetensors bit-identical: {identical}")
    print("converter's own report (its main process RSS, without the model-building child):")
    for row in rows[1:]:
        print(f"  {row[4]}")


if __name__ == "__main__":
    main()

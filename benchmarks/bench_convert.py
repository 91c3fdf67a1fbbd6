"""Benchmark: converting a full-size SDXL base file vs copying it with `cp`, and peak memory.

    python benchmarks/bench_convert.py --keys ../shared/reference/sdxl_keys/mindone/model_conversion/torch_key_base.yaml
    python benchmarks/bench_convert.py --input sd_xl_base_1.0.safetensors     # the real file, if you have it

Without --input it writes a random fp16 official-layout file (6.9 GB) from the key list into --workdir
first. Every step runs as its own process, timed from outside; peak RSS is read with wait4(), so it
covers the step's whole process tree (a converter given a config of other modules than SDXL base's builds the
model's name list in a child; the shipped config's names come from the rules, in the converter's own process).
Steps, in turn, `--warmup` rounds (not counted: the first round after writing the input was 2-4x slower for
every step, cp included) then `--repeats` rounds, each step after an untimed `sync` (medians reported): cp of the
input, alone and with an fsync of the copy (the converter fsyncs); pt_to_ms fp16; ms_to_pt fp16 (back to the original, checked
bit-identical); pt_to_ms fp32 (the default). The input is warm in the page cache for every step, cp included.
Needs ~28 GB free in --workdir.
"""
import argparse
import filecmp
import os
import statistics
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
    p.add_argument("--repeats", type=int, default=3, help="times each step runs (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="rounds of all steps run first and not counted")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    py = sys.executable
    runs = {}  # step -> [(seconds, peak RSS GiB, output GiB, converter's own line)]
    try:
        src = Path(args.input) if args.input else work / "sdxl_random.safetensors"
        if not args.input:
            seconds, rss, _ = timed([py, str(MAKE), "--keys", args.keys, "--out", str(src)])
            print(f"wrote random input in {seconds:.1f} s")
        size = src.stat().st_size / 2**30
        with open(src, "rb") as f:  # warm the page cache for every step alike
            while f.read(64 << 20):
                pass
        copy, ckpt16, back, ckpt32 = (work / n for n in ("copy.safetensors", "fp16.ckpt", "back.safetensors",
                                                         "fp32.ckpt"))
        convert = [py, str(CLI), "--no_progress", "--task"]
        # The converter fsyncs its output before renaming it into place (no half-written checkpoint after a
        # crash), having had the disk write it all along (write-behind); `cp` does neither, so cp is also timed
        # with the same fsync (coreutils' `sync FILE`).
        steps = [
            ("cp (same file)", copy, ["cp", str(src), str(copy)]),
            ("cp + fsync (same file)", copy, ["sh", "-c", f"cp '{src}' '{copy}' && sync '{copy}'"]),
            ("pt_to_ms --dtype fp16", ckpt16, convert + ["pt_to_ms", "--weight_safetensors", str(src),
                                                         "--weight_ms", str(ckpt16), "--dtype", "fp16"]),
            ("ms_to_pt --dtype fp16", back, convert + ["ms_to_pt", "--weight_ms", str(ckpt16),
                                                       "--weight_safetensors", str(back), "--dtype", "fp16"]),
            ("pt_to_ms (fp32, default)", ckpt32, convert + ["pt_to_ms", "--weight_safetensors", str(src),
                                                            "--weight_ms", str(ckpt32)]),
        ]
        for round_index in range(args.warmup + args.repeats):
            for name, output, cmd in steps:
                output.unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)  # untimed: no dirty pages of an earlier step left to write
                seconds, rss, out = timed(cmd)
                if round_index >= args.warmup:
                    runs.setdefault(name, []).append((seconds, rss, output.stat().st_size / 2**30, out.strip()))
            identical = filecmp.cmp(src, back, shallow=False)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    print(f"\ninput: {src.name if args.input else 'random fp16, official layout'}, {size:.2f} GiB; "
          f"{os.cpu_count()} CPUs; median of {args.repeats} after {args.warmup} uncounted (each step after a `sync`, "
          "steps in turn)")
    print(f"{'step':28s} {'wall s':>7s} {'x cp':>6s} {'x cp+fsync':>10s} {'peak RSS GiB':>13s} {'output GiB':>11s}  all s")
    cp_seconds = statistics.median(r[0] for r in runs["cp (same file)"])
    cp_sync_seconds = statistics.median(r[0] for r in runs["cp + fsync (same file)"])
    for name, rows in runs.items():
        seconds = statistics.median(r[0] for r in rows)
        print(f"{name:28s} {seconds:7.1f} {seconds / cp_seconds:6.2f} {seconds / cp_sync_seconds:10.2f} "
              f"{max(r[1] for r in rows):13.2f} {rows[-1][2]:11.2f}  {' '.join(f'{r[0]:.1f}' for r in rows)}")
    print(f"round trip safetensors -> ckpt -> safetensors bit-identical: {identical}")
    print("converter's own report (its main process's RSS):")
    for name, rows in runs.items():
        if rows[-1][3]:
            print(f"  {rows[-1][3]}")


if __name__ == "__main__":
    main()

"""Benchmark: the main job (train_dreambooth.py on the tiny SDXL, CPU) - seconds per step and peak RSS.

    python benchmarks/bench_tiny_training.py                     # GRAPH and PyNative, UNet LoRA and + text encoders
    python benchmarks/bench_tiny_training.py --steps 30 --runs graph graph_text

Each run is the real training script in a memory-guarded child process (benchmarks/common.py), from the
same tiny base weights, subject images and class images (sampled once, before the timed runs). Reported
per run: the first step (GRAPH compile included) apart, the median of the later steps (train_dreambooth's
own `seconds_per_step` column of loss.csv), the whole run's wall time and the child's peak RSS (wait4).
Results go to stdout as `RESULT {json}` lines and a markdown table."""
import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from mindbooth.config import ALLOCATORS

RUNS = {  # name -> extra flags of train_dreambooth.py
    "graph": ["--ms_mode", "0"],
    "pynative": ["--ms_mode", "1"],
    "graph_text": ["--ms_mode", "0", "--train_text_encoder", "True"],
    "graph_cached": ["--ms_mode", "0", "--cache_latents", "True"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first is the warm-up)")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["graph", "pynative", "graph_text", "graph_cached"])
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=["mimalloc"],
                        help="train_dreambooth.py's --allocator: each run is repeated with each")
    parser.add_argument("--rss_limit_gib", type=float, default=16.0)
    args = parser.parse_args()

    python, root = sys.executable, common.ROOT
    config = root / "configs" / "training" / "sd_xl_tiny_dreambooth_lora_cpu.yaml"
    with tempfile.TemporaryDirectory(prefix="bench_tiny_") as work:
        work = Path(work)
        weight = work / "tiny.ckpt"
        subprocess.run([python, str(root / "tools" / "make_tiny_model.py"), "--config", str(root / "configs" / "inference" / "sd_xl_tiny.yaml"),
                        "--weight_ms", str(weight), "--subject_dir", str(work / "subject")], check=True, cwd=root)
        common_flags = ["--config", str(config), "--weight", str(weight), "--instance_data_path", str(work / "subject"),
                        "--instance_prompt", "a photo of sks toy", "--class_data_path", str(work / "class"),
                        "--class_prompt", "a photo of toy", "--device_target", "CPU"]
        # class images once, untimed: a 1-step run samples the missing ones
        subprocess.run([python, "train_dreambooth.py", *common_flags, "--total_step", "1", "--save_path", str(work / "warmup"),
                        "--ms_mode", "1"], check=True, cwd=root, stdout=subprocess.DEVNULL)
        rows = []
        for name, allocator in [(n, a) for n in args.runs for a in args.allocators]:
            save_path = work / f"{name}_{allocator}"
            flags = [*RUNS[name], "--allocator", allocator]
            argv = [python, "train_dreambooth.py", *common_flags, *flags, "--total_step", str(args.steps),
                    "--save_ckpt_interval", str(args.steps), "--save_path", str(save_path)]
            guard = common.run_guarded(argv, args.rss_limit_gib)  # the script itself preloads its --allocator
            seconds = _seconds_per_step(save_path / "loss.csv")
            result = {"benchmark": "tiny_training", "run": name, "flags": flags, "steps": args.steps,
                      "first_step_s": round(seconds[0], 2) if seconds else None,
                      "median_step_s": round(statistics.median(seconds[1:]), 3) if len(seconds) > 1 else None,
                      **{k: guard[k] for k in ("returncode", "killed", "peak_rss_gib", "wall_s", "loadavg_before", "loadavg_after")},
                      "machine": common.machine(), "versions": common.versions("mindspore")}
            common.emit(result)
            rows.append(result)
    print("\n| run | flags | first step s | median step s | peak RSS GiB | wall s | load avg before |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | `{' '.join(r['flags'])}` | {r['first_step_s']} | {r['median_step_s']} | {r['peak_rss_gib']} | "
              f"{r['wall_s']} | {r['loadavg_before'][0]} |")


def _seconds_per_step(loss_csv: Path):
    if not loss_csv.is_file():
        return []
    with open(loss_csv) as handle:
        return [float(row["seconds_per_step"]) for row in csv.DictReader(handle)]


if __name__ == "__main__":
    main()

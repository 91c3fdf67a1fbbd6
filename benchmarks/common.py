"""Shared helpers of the benchmarks: a memory-guarded child process, timing, versions, machine facts.

Every benchmark runs its measurement in a child process (itself with `--child`) that a parent watches:
the parent samples the child's RSS from /proc every 0.2 s, kills it above `--rss_limit_gib` (the machine
has no swap; MindSpore and torch reserve huge virtual ranges, so an address-space limit would not work),
and reports the child's peak RSS from wait4() (the kernel's high-water mark, not a sample)."""
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # gm/ and mindbooth/ import from the repository root
    sys.path.insert(0, str(ROOT))
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
ALLOCATORS = ("system", "jemalloc", "mimalloc")  # allocator_env


def rss_gib(pid="self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def peak_rss_gib() -> float:
    """This process's peak RSS so far (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def machine() -> dict:
    cpu = ""
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "mem_gib": round(mem, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def versions(framework: str) -> dict:
    out = {"numpy": __import__("numpy").__version__}
    if framework == "mindspore":
        import mindspore
        out["mindspore"] = mindspore.__version__
    else:
        import diffusers
        import peft
        import torch
        out.update(torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__,
                   torch_threads=torch.get_num_threads())
    out["ld_preload"] = os.environ.get("LD_PRELOAD", "")  # the allocator
    return out


def median_after_warmup(times):
    return statistics.median(times[1:]) if len(times) > 1 else None


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn() after one untimed call (GRAPH mode compiles there)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(result: dict):
    print("RESULT " + json.dumps(result), flush=True)


def allocator_env(allocator: str) -> dict:
    """The environment of a child process that runs with `allocator`: system (glibc), jemalloc (Debian's
    libjemalloc2, the reference's), or mimalloc (what MindBooth preloads on CPU, mindbooth/allocator.py)."""
    from mindbooth.allocator import preload_env

    env = preload_env("system")
    if allocator == "jemalloc":
        if not os.path.exists(JEMALLOC):
            sys.exit(f"--allocator jemalloc: {JEMALLOC} not found (apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = JEMALLOC
    elif allocator == "mimalloc":
        env = preload_env("mimalloc", env)
        if "libmimalloc" not in env.get("LD_PRELOAD", ""):
            sys.exit("--allocator mimalloc: not installed (pip install cmeel-mimalloc)")
    return env


def run_guarded(argv, rss_limit_gib: float, allocator: str = "system", timeout_s: float = None) -> dict:
    """Run `argv` (a benchmark with --child) under the RSS guard, with `allocator` preloaded; return its RESULT
    dict plus the guard's facts (peak RSS of the child from wait4, killed or not, load average before/after)."""
    env = allocator_env(allocator)
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True, env=env, start_new_session=True)
    state = {"sampled_peak": 0.0, "killed": None}

    def watch():
        while proc.poll() is None:
            try:
                rss = rss_gib(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            state["sampled_peak"] = max(state["sampled_peak"], rss)
            if rss > rss_limit_gib:
                state["killed"] = f"RSS {rss:.1f} GiB > limit {rss_limit_gib} GiB"
                os.killpg(proc.pid, signal.SIGKILL)
                return
            if timeout_s and time.perf_counter() - start > timeout_s:
                state["killed"] = f"timeout {timeout_s} s"
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result, partial = {}, []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.startswith("PARTIAL "):
            partial.append(json.loads(line[len("PARTIAL "):]))
    _, status, usage = os.wait4(proc.pid, 0)
    watcher.join()
    result.update(
        returncode=os.waitstatus_to_exitcode(status),
        killed=state["killed"],
        peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
        wall_s=round(time.perf_counter() - start, 1),
        loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in os.getloadavg()],
    )
    if partial and "partial" not in result:
        result["partial"] = partial[-1]
    return result


def benchmark_parser(description: str):
    """The flags every framework-vs-framework benchmark takes; a script adds its own to the returned parser."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--framework", choices=["mindspore", "torch"], required=True)
    p.add_argument("--mode", choices=["graph", "pynative"], default="graph", help="MindSpore only")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="steps in all; the first is the warm-up")
    p.add_argument("--count_flops", type=int, default=1,
                   help="torch: count FLOPs of one step (bench_train_step.py: 2 = count on the meta device, run nothing)")
    p.add_argument("--allocator", choices=ALLOCATORS, default=None,
                   help="malloc of the measured process (default: jemalloc for torch, as the reference is best "
                        "run; mimalloc for MindSpore, as train_dreambooth.py runs on CPU)")
    p.add_argument("--frozen_dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="MindSpore only: dtype the frozen UNet/VAE weights are stored in (computed in fp32)")
    p.add_argument("--rss_limit_gib", type=float, default=20.0)
    p.add_argument("--model", choices=sorted(MODELS), default="sdxl", help="the full-size UNet measured, both frameworks")
    p.add_argument("--transformer_depth", type=int, nargs=3, default=None,
                   help="SDXL: transformer blocks per UNet level, both frameworks (released: 1 2 10; e.g. 1 2 2 for a "
                        "reduced full-width UNet that is quicker to measure; level 0 has no attention in SDXL)")
    p.add_argument("--profile_ops", type=int, default=0,
                   help="MindSpore: after the timed steps, run one more under mindspore.Profiler and print kernel "
                        "time by op type (PROFILE lines, in the result as profile_ops)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def default_allocator(args) -> str:
    return args.allocator or ("jemalloc" if args.framework == "torch" else "mimalloc")


def run_benchmark(args, script: str, benchmark: str, run_mindspore, run_torch):
    """Parent: re-run this script as a memory-guarded child and print its result. Child: measure, print the result."""
    if not args.child:
        result = run_guarded([sys.executable, script, *sys.argv[1:], "--child"], args.rss_limit_gib,
                             allocator=default_allocator(args))
        result["command"] = f"python benchmarks/{Path(script).name} " + " ".join(sys.argv[1:])
        emit(result)
        return
    out = run_mindspore(args) if args.framework == "mindspore" else run_torch(args)
    times, cpu = out.pop("times"), out.pop("cpu_times")
    if args.framework == "mindspore":
        out["frozen_dtype"] = args.frozen_dtype
    emit(dict(benchmark=benchmark, framework=args.framework, model=args.model,
              mode=args.mode if args.framework == "mindspore" else "eager", resolution=args.resolution,
              first_step_s=round(times[0], 2), median_step_s=median_after_warmup(times),
              step_times_s=[round(t, 2) for t in times],
              step_cpu_s=[round(t, 2) for t in cpu], median_step_cpu_s=median_after_warmup(cpu),
              child_peak_rss_gib=round(peak_rss_gib(), 2),
              versions=versions(args.framework), machine=machine(), **out))


def progress(**fields):
    """A line the parent keeps as the last known state if the child dies (memory guard)."""
    fields["rss_gib"] = round(rss_gib(), 2)
    print("PARTIAL " + json.dumps(fields), flush=True)


def profile_op_types(run_step, top: int = 25) -> list:
    """Run `run_step()` once under mindspore.Profiler; returns [(op type, ms, share of kernel time)] by time, and
    prints them. The op types' kernel times are what MindSpore's CPU backend measured per kernel launch."""
    import csv
    import tempfile

    import mindspore as ms

    # MINDBOOTH_PROFILE_DIR keeps the profiler's files (per-launch timestamps by scope name) for a closer look
    keep = os.environ.get("MINDBOOTH_PROFILE_DIR")
    folder = keep or tempfile.mkdtemp(prefix="mindbooth-profile-")
    profiler = ms.Profiler(output_path=folder)
    start, sys_start = time.perf_counter(), os.times().system
    run_step()
    wall_s, sys_s = time.perf_counter() - start, os.times().system - sys_start
    profiler.analyse()
    table = next(Path(folder).rglob("cpu_op_type_info_*.csv"))
    with open(table) as f:
        rows = [(r["op_type"], float(r["total_compute_time"]), int(r["type_occurrences"])) for r in csv.DictReader(f)]
    total = sum(ms_ for _, ms_, _ in rows)
    rows = sorted(rows, key=lambda r: -r[1])[:top]
    print(f"PROFILE kernel time {total / 1000:.2f} s", flush=True)
    for op, ms_, count in rows:
        print(f"PROFILE {op:24s} {ms_:10.0f} ms {100 * ms_ / total:5.1f} % {count:6d} launches", flush=True)
    span_ms, gaps = _launch_gaps(next(Path(folder).rglob("cpu_op_execute_timestamp_*.txt")))
    print(f"PROFILE step {wall_s:.2f} s wall ({sys_s:.2f} s of CPU time in the kernel, e.g. page faults)", flush=True)
    print(f"PROFILE span {span_ms / 1000:.2f} s, {sum(gaps.values()) / 1000:.2f} s between kernels; the largest "
          f"shares by the kernel launched next:", flush=True)
    for op, gap in sorted(gaps.items(), key=lambda item: -item[1])[:10]:
        print(f"PROFILE   before {op:24s} {gap:10.0f} ms", flush=True)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return [dict(op=op, ms=round(ms_), share=round(ms_ / total, 4), launches=count) for op, ms_, count in rows] + [
        dict(op="(all)", ms=round(total), span_ms=round(span_ms), between_kernels_ms=round(sum(gaps.values())),
             step_wall_ms=round(wall_s * 1000), step_system_cpu_ms=round(sys_s * 1000))]


def _launch_gaps(timestamps_file):
    """From the CPU profiler's per-launch (start ns, duration ms) lists: the span from the first launch's start to the
    last one's end, and the time between one kernel's end and the next one's start, summed by the next one's type."""
    import collections

    launches = []
    for line in Path(timestamps_file).read_text().splitlines():
        name, _, times = line.split(";", 2)
        op = name.rsplit("/", 1)[-1].split("-op")[0]
        for entry in times.split():
            start_ns, duration_ms, _ = entry.split(",")
            launches.append((int(start_ns), float(duration_ms) * 1e6, op))
    launches.sort()
    gaps = collections.Counter()
    for (start, duration, _), (next_start, _, next_op) in zip(launches, launches[1:]):
        gaps[next_op] += max(0.0, next_start - start - duration) / 1e6
    span = (launches[-1][0] + launches[-1][1] - launches[0][0]) / 1e6
    return span, gaps


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# --- A full-size UNet with random weights, built alike for both frameworks (no download). ---
#
# MindBooth: the DiffusionEngine of the model's inference config, with LoRA rank 4 on to_q/to_k/to_v/to_out.0 as
# the DreamBooth configs set it (or all UNet weights trainable for `--finetune full`), and the tiny text encoders and
# VAE of the model's tiny config in place of the full ones: the benchmarks feed cached latents and embeddings, so
# those parts never run, and the full ones would only hold memory. Weights are MindSpore's default initializers, and
# the output layers sgm zero-initialises are randomised (randomise_zero_initialised below), as diffusers'
# initialisation leaves them.
#
# Reference: diffusers' UNet2DConditionModel with the released model's config values (its unet/config.json,
# typed in here), default initialisation.

CONFIGS = ROOT / "configs" / "inference"

SDXL_TRANSFORMER_DEPTH = (1, 2, 10)  # per level; the middle block takes the last level's depth
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=SDXL_TRANSFORMER_DEPTH, attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    upcast_attention=False,
)
# segmind/SSD-1B: SDXL's channels with per-block transformer depths and a middle block without attention
SSD_1B_UNET_CONFIG = dict(
    SDXL_UNET_CONFIG, transformer_layers_per_block=(1, (2, 2), (4, 4)),
    reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), 1), mid_block_type="UNetMidBlock2D",
)
# runwayml/stable-diffusion-v1-5
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    use_linear_projection=False, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", upcast_attention=False,
)



def if_unet_config(path: Path) -> dict:
    """DeepFloyd IF's UNet2DConditionModel config: the MindBooth config's network fields are diffusers' (if_unet.py)."""
    from omegaconf import OmegaConf

    fields = OmegaConf.to_container(OmegaConf.load(path).model.params.network_config.params)
    fields.pop("spatial_transformer_attn_type")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
IF_LORA_TARGETS = LORA_TARGETS + ("add_k_proj", "add_v_proj")  # diffusers' IF DreamBooth LoRA recipe, as MindBooth's


@dataclass(frozen=True)
class BenchModel:
    """A model the benchmarks build at full size in both frameworks (`--model`)."""
    inference_config: Path
    tiny_config: Path  # its text encoders and VAE stand in for the full ones (never run: the inputs are cached)
    diffusers_unet: dict  # UNet2DConditionModel's config of the released model
    context_dim: int  # width of the text embeddings the UNet cross-attends to
    pooled_dim: int  # pooled text embedding of the size conditioning; 0: no size conditioning (SD 1.x/2.x)
    latents_per_pixel: int = 8  # 1: pixel space (IF: the UNet sees the image)
    channels: int = 4  # of the UNet's input (latents or pixels)
    lora_targets: tuple = LORA_TARGETS
    lora_attentions: tuple = ()  # MindBooth's lora_config.attentions where the model's attention cells are named so
    alphas_cumprod: str = "scaled_linear"  # the reference's noise schedule: scaled_linear (SD) or cosine (IF)


MODELS = {
    "sdxl": BenchModel(CONFIGS / "sd_xl_base.yaml", CONFIGS / "sd_xl_tiny.yaml", SDXL_UNET_CONFIG, 2048, 1280),
    "ssd-1b": BenchModel(CONFIGS / "ssd_1b.yaml", CONFIGS / "ssd_1b_tiny.yaml", SSD_1B_UNET_CONFIG, 2048, 1280),
    "sd1.5": BenchModel(CONFIGS / "sd_v1.5.yaml", CONFIGS / "sd_v1.5_tiny.yaml", SD15_UNET_CONFIG, 768, 0),
    "if-i-xl": BenchModel(CONFIGS / "if_i_xl.yaml", CONFIGS / "if_i_tiny.yaml", if_unet_config(CONFIGS / "if_i_xl.yaml"),
                          4096, 0, latents_per_pixel=1, channels=3, lora_targets=IF_LORA_TARGETS,
                          lora_attentions=("attentions",), alphas_cumprod="cosine"),
}
LORA_CONFIG = dict(rank=4, alpha=4, dropout=0.0)  # the DreamBooth configs', on the model's lora_targets


def build_mindspore_engine(args, train: bool):
    """Set MindSpore's device and mode from the benchmark's flags, build the full-size engine, report the build
    time; returns (engine, build seconds)."""
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(0)  # the same random weights in every run, so that runs compare by their losses too
    start = time.perf_counter()
    engine = mindbooth_engine(args.model, train=train, finetune=getattr(args, "finetune", "lora"),
                              frozen_dtype=args.frozen_dtype, transformer_depth=args.transformer_depth)
    build_s = time.perf_counter() - start
    progress(stage="built", build_s=round(build_s, 1))
    return engine, build_s


def mindbooth_engine(model: str = "sdxl", train: bool = True, finetune: str = "lora", frozen_dtype: str = "fp32",
                     transformer_depth=None):
    """`train`: the DreamBooth engine (`finetune` lora: LoRA trainable, the rest frozen; full: every UNet weight
    trainable); else the inference engine. `transformer_depth` (SDXL only): blocks per level in place of 1 2 10."""
    from gm.models.diffusion import DiffusionEngine
    from gm.util import instantiate_from_config
    from mindbooth.config import load_config

    bench = MODELS[model]
    config = load_config(bench.inference_config).model
    tiny = load_config(bench.tiny_config).model.params
    config.params.conditioner_config = tiny.conditioner_config
    config.params.first_stage_config = tiny.first_stage_config
    if frozen_dtype != "fp32":
        config.params.frozen_weight_dtype = frozen_dtype
    if train and finetune == "lora":
        config.params.lora_config = dict(LORA_CONFIG, target_modules=list(bench.lora_targets))
        if bench.lora_attentions:
            config.params.lora_config.attentions = list(bench.lora_attentions)
    if transformer_depth is not None:
        if model != "sdxl":
            sys.exit("--transformer_depth: SDXL only")
        config.params.network_config.params.transformer_depth = list(transformer_depth)
    if train and finetune == "full" and not hasattr(DiffusionEngine, "make_trainable"):
        sys.exit("--finetune full: DiffusionEngine.make_trainable (train_dreambooth.py --finetune full) has not landed yet")
    engine = instantiate_from_config(config)
    if train and finetune == "full":
        engine.make_trainable(["model.diffusion_model."])  # as train_dreambooth.py --finetune full
    randomise_zero_initialised(engine.model.diffusion_model)
    return engine


# Output layers sgm zero-initialises (zero_module): with them zero the LoRA'd attention has no effect on the
# loss and LoRA gets no gradient. diffusers initialises them randomly; so does the benchmark.
ZERO_INITIALISED = ("proj_out.weight", "out_layers.3.weight", "out.2.weight")


def randomise_zero_initialised(unet, seed: int = 0):
    import mindspore as ms
    import numpy as np

    rng = np.random.default_rng(seed)
    for name, param in unet.parameters_and_names():
        if name.endswith(ZERO_INITIALISED):
            fan_in = int(np.prod(param.shape[1:]))
            values = rng.uniform(-1, 1, param.shape).astype(np.float32) / np.sqrt(fan_in)  # torch's default bound
            param.set_data(ms.Tensor(values).astype(param.dtype))


def diffusers_unet(model: str = "sdxl", train: str = "lora", transformer_depth=None):
    """The reference UNet: `train` "lora" (peft LoRA trainable, as train_dreambooth_lora_sdxl.py), "full" (every
    weight trainable, as train_dreambooth.py) or "" (frozen, for sampling)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(MODELS[model].diffusers_unet)
    if transformer_depth is not None:
        config["transformer_layers_per_block"] = tuple(transformer_depth)
    unet = UNet2DConditionModel(**config)
    unet.requires_grad_(train == "full")
    if train == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=list(MODELS[model].lora_targets)))
    return unet

"""Benchmark: one DreamBooth training step (LoRA or full fine-tune) of a full-size UNet (random weights, fp32, CPU).

    python benchmarks/bench_train_step.py --framework mindspore --mode graph --resolution 512
    python benchmarks/bench_train_step.py --framework mindspore --mode pynative --resolution 512
    python benchmarks/bench_train_step.py --framework mindspore --mode graph --resolution 512 --frozen_dtype fp16
    python benchmarks/bench_train_step.py --framework torch --resolution 512          # jemalloc (--allocator)
    python benchmarks/bench_train_step.py --framework mindspore --mode graph --resolution 1024 --frozen_dtype fp16 --split_prior_batch 1
    python benchmarks/bench_train_step.py --framework torch --resolution 1024 --gradient_checkpointing 1
    python benchmarks/bench_train_step.py --framework mindspore --model sd1.5 --finetune full --resolution 512
    python benchmarks/bench_train_step.py --framework mindspore --model ssd-1b --resolution 1024 --frozen_dtype fp16 --split_prior_batch 1
    python benchmarks/bench_train_step.py --framework mindspore --model if-i-xl --resolution 64 --frozen_dtype fp16

`--model` sdxl (default), ssd-1b, sd1.5 or if-i-xl (DeepFloyd IF stage I, pixel space: `--resolution 64`;
LoRA also on its added text keys/values, add_k_proj/add_v_proj, as diffusers' IF recipe). Batch: 1 instance + 1 class sample (prior preservation), latents and
text embeddings cached (random tensors of the cached shapes), LoRA rank 4 on attn to_q/to_k/to_v/to_out.0 and AdamW
(lr 5e-5) on the LoRA weights, or with `--finetune full` AdamW (lr 5e-6, the paper's) on every UNet weight;
gradient clipping at 1.0. MindBooth: GradStep + ApplyStep of mindbooth/train_step.py (a full fine-tune without
--split_prior_batch: one FusedStep, as the trainer runs it). Reference: diffusers UNet2DConditionModel + peft (as train_dreambooth_lora_sdxl.py; without peft, all weights trainable, as
train_dreambooth.py), SDPA attention. `--split_prior_batch 1`
(both frameworks) runs the instance and the class sample as two forward/backward passes into the same gradients
(train_dreambooth.py's --split_prior_batch); `--gradient_checkpointing 1` (both) keeps only each UNet block's inputs
and recomputes its forward in the backward (diffusers' option of that name; train_dreambooth.py's).
Prints one `RESULT {json}` line: in GRAPH mode the gradient step's compile time and the RSS after it, the first
step (the optimizer step's compile included) apart, median of the later steps, peak
RSS of the measuring process and its children (wait4), load average. With `--compile_in_child 1` (the default, as
train_dreambooth.py runs on CPU) a child compiles both step graphs first (`child_s`) and the compile time is that of
loading both. The torch run also counts the step's FLOPs
(torch.utils.flop_counter, matmul/conv/attention), which is the same network's count for both; `--count_flops 2`
counts them on the meta device (shapes only: seconds, any resolution) and runs nothing."""
import shutil
import sys
import tempfile
import time

import numpy as np

import common


def batch_arrays(resolution: int, model: str = "sdxl", seed: int = 0):
    """The cached inputs of one step; `pooled` and `time_ids` only for a model with size conditioning."""
    bench = common.MODELS[model]
    rng = np.random.default_rng(seed)
    side = resolution // bench.latents_per_pixel
    arrays = dict(
        latents=rng.standard_normal((2, bench.channels, side, side)).astype(np.float32),
        noise=rng.standard_normal((2, bench.channels, side, side)).astype(np.float32),
        crossattn=rng.standard_normal((2, 77, bench.context_dim)).astype(np.float32),
    )
    if bench.pooled_dim:
        arrays["pooled"] = rng.standard_normal((2, bench.pooled_dim)).astype(np.float32)
        arrays["time_ids"] = np.tile(np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32), (2, 1))
    return arrays


def mindspore_vector(arrays):
    """SDXL's `vector` (2816): pooled text (1280) + 6 size numbers x 256-dim Fourier features; (2, 0) without size
    conditioning, as the conditioner gives it."""
    from gm.modules.diffusionmodules.util import timestep_embedding
    import mindspore as ms

    if "pooled" not in arrays:
        return np.zeros((2, 0), np.float32)
    feats = timestep_embedding(ms.Tensor(arrays["time_ids"].reshape(-1)), 256).asnumpy().reshape(2, -1)
    return np.concatenate([arrays["pooled"], feats], axis=1).astype(np.float32)


def reference_added_cond(tensors: dict):
    """diffusers' added_cond_kwargs of the batch: SDXL's pooled text and size numbers, or None (SD 1.x)."""
    return {"text_embeds": tensors["pooled"], "time_ids": tensors["time_ids"]} if "pooled" in tensors else None


def learning_rate(args) -> float:
    return 5e-6 if args.finetune == "full" else 5e-5


def fused_step(args) -> bool:
    """Whether the trainer runs this step as one FusedStep graph (mindbooth/training.py build_steps)."""
    return args.finetune == "full" and not args.split_prior_batch


def mindspore_grad_step(args):
    """As the trainer builds them: the full-size engine's LoRA parameters, their gradient buffers, the GradStep in
    training mode and its inputs (latents, noise, sigmas, conditioning, loss scale, loss weight) for each pass of the
    step (prior_passes: one, or two with --split_prior_batch). Returns (grad_step, params, buffers, passes' inputs,
    build seconds)."""
    import mindspore as ms

    from gm.modules.lora import lora_parameters
    from mindbooth.context_projections import ContextProjections
    from mindbooth.optim import AdamWPerParameter
    from mindbooth.train_step import DreamBoothLoss, FusedStep, GradStep, make_buffers, prior_passes, step_conditioning

    engine, build_s = common.build_mindspore_engine(args, train=True)
    if args.gradient_checkpointing:  # as train_dreambooth.py's --gradient_checkpointing
        engine.model.diffusion_model.enable_gradient_checkpointing(res_blocks=bool(args.gradient_checkpointing_res_blocks))
    if args.finetune == "full":
        params = sorted(engine.trainable_params(), key=lambda p: p.name)
    else:
        params = [p for _, p in sorted(lora_parameters(engine).items())]
    passes = prior_passes(1, True, bool(args.split_prior_batch), 1.0)
    loss_net = DreamBoothLoss(engine, 1.0, len(passes) == 1)
    if fused_step(args):  # as the trainer builds a full fine-tune's step without accumulation: no gradient buffer
        buffers = None
        grad_step = FusedStep(loss_net, params, AdamWPerParameter(params, learning_rate=learning_rate(args)), True, 1.0)
    else:
        buffers = make_buffers(params)
        grad_step = GradStep(loss_net, params, buffers)
    grad_step.set_train(True)
    arrays = dict(batch_arrays(args.resolution, args.model), sigmas=np.array([14.6, 0.03], np.float32), vector=None)
    arrays["vector"] = mindspore_vector(arrays)
    # As the trainer: the text's frozen cross-attention keys/values once per run (timed apart), unless switched off
    start = time.perf_counter()
    inputs = []
    unet = engine.model.diffusion_model
    for rows, loss_weight in passes:
        # IF's UNet has no such cache (its text keys/values carry LoRA), as in the trainer
        # (nor a full fine-tune: the keys/values' weights train)
        cached = args.context_projections and hasattr(unet, "context_projections") and args.finetune != "full"
        projections = ContextProjections(unet) if cached else None
        conditioning = step_conditioning([ms.Tensor(arrays["crossattn"][rows]), ms.Tensor(arrays["vector"][rows])], projections)
        inputs.append([ms.Tensor(arrays[name][rows]) for name in ("latents", "noise", "sigmas")]
                      + [conditioning, ms.Tensor(1.0, ms.float32), ms.Tensor(loss_weight, ms.float32)])
    common.progress(stage="context projections", seconds=round(time.perf_counter() - start, 2))
    return grad_step, params, buffers, inputs, build_s


def run_mindspore(args):
    from mindbooth.compile_cache import cache_folder, compile_in_child, compile_step_graphs, precompile_folder
    from mindbooth.optim import AdamW
    from mindbooth.train_step import ApplyStep

    # As train_dreambooth.py on CPU: a child compiles both step graphs into a cache and exits before this
    # process builds its model; this process loads them (mindbooth/compile_cache.py).
    step_cache, cache_root, child_s = precompile_folder(), None, None
    if step_cache is None and args.mode == "graph" and args.compile_in_child:
        cache_root = tempfile.mkdtemp(prefix="mindbooth-bench-cache-")  # a first run: nothing cached before
        start = time.perf_counter()
        step_cache = cache_folder(cache_root, __file__, vars(args))
        if not compile_in_child(step_cache, __file__, sys.argv[1:]):
            step_cache = None
        child_s = round(time.perf_counter() - start, 1)
        common.progress(stage="compiled in child", seconds=child_s)
    grad_step, params, buffers, inputs, build_s = mindspore_grad_step(args)
    apply_step = None if fused_step(args) else ApplyStep(buffers, AdamW(params, learning_rate=learning_rate(args)), 1, True, 1.0)
    if precompile_folder() is not None:  # the child: compile into the cache and leave
        compile_step_graphs(step_cache, grad_step, apply_step, inputs[0])
        sys.exit(0)
    rss_model = common.rss_gib()
    compile_s = None
    if args.mode == "graph":  # compiled apart, so that what the graph's build holds is seen apart from the step's
        start = time.perf_counter()
        if step_cache is not None:  # loads both graphs (the optimizer step's too)
            compile_step_graphs(step_cache, grad_step, apply_step, inputs[0])
        else:
            grad_step.compile(*inputs[0])
        compile_s = time.perf_counter() - start
        common.progress(stage="compiled", compile_s=round(compile_s, 1))
    if cache_root is not None:
        shutil.rmtree(cache_root, ignore_errors=True)
    rss_compiled = common.rss_gib()
    times, cpu, apply_times = [], [], []

    def gradients():  # the passes' gradients into the buffers; the step's loss
        return sum(float(grad_step(*pass_inputs)[0].asnumpy()) for pass_inputs in inputs)

    for i in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = gradients()
        apply_start = time.perf_counter()
        if apply_step is not None:  # (a FusedStep took it already)
            apply_step().asnumpy()  # gradient clipping and AdamW
        apply_times.append(round(time.perf_counter() - apply_start, 3))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        common.progress(stage=f"step {i}", seconds=round(times[-1], 2), optimizer_s=apply_times[-1], loss=loss,
                        peak=round(common.peak_rss_gib(), 2))
    profile = common.profile_op_types(lambda: (gradients(), apply_step and apply_step())) if args.profile_ops else None
    return dict(build_s=build_s, times=times, cpu_times=cpu, rss_after_build_gib=rss_model, loss=loss, profile_ops=profile,
                optimizer_step_s=apply_times,
                grad_step_compile_s=compile_s, compiled_in_child=step_cache is not None, child_s=child_s, rss_after_compile_gib=round(rss_compiled, 2),
                trained_params=int(sum(np.prod(p.shape) for p in params)), finetune=args.finetune)


def torch_unet_and_loss(args, device="cpu"):
    """The reference's UNet (train mode; LoRA or all weights trainable) and `loss_of(rows)`: the mean loss of each part (instance, class)
    among the batch's `rows`, summed. Returns (unet, loss_of)."""
    import torch
    import torch.nn.functional as F

    with torch.device(device):
        unet = common.diffusers_unet(args.model, train=args.finetune, transformer_depth=args.transformer_depth)
    unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    tensors = {k: torch.from_numpy(v).to(device) for k, v in batch_arrays(args.resolution, args.model).items()}
    latents, noise, hidden = tensors["latents"], tensors["noise"], tensors["crossattn"]
    cond = reference_added_cond(tensors)
    timesteps = torch.tensor([999, 1], device=device)
    alphas = reference_alphas_cumprod(common.MODELS[args.model].alphas_cumprod).to(device)

    def loss_of(rows):
        a = alphas[timesteps[rows]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents[rows] + (1 - a).sqrt() * noise[rows]
        added = {k: v[rows] for k, v in cond.items()} if cond else None
        # IF's UNet also predicts its variance (6 channels); the loss is on the noise half, as IF trains
        pred = unet(noisy, timesteps[rows], hidden[rows], added_cond_kwargs=added).sample[:, :latents.shape[1]]
        return sum(F.mse_loss(p, n) for p, n in zip(pred.chunk(pred.shape[0]), noise[rows].chunk(pred.shape[0])))

    return unet, loss_of


def reference_alphas_cumprod(schedule: str):
    """The 1000 cumulative alphas of the model's noise schedule, as its diffusers scheduler has them."""
    from diffusers import DDPMScheduler

    beta_schedule = {"scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}[schedule]
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule).alphas_cumprod


def reference_passes(args) -> tuple:
    """The batch rows of each backward pass (adding into .grad): both, or the instance row, then the class row."""
    return (slice(0, 1), slice(1, 2)) if args.split_prior_batch else (slice(0, 2),)


def count_flops_on_meta(args) -> dict:
    """The FLOPs (matmul/conv/attention, forward + backward) of the reference's gradient step, counted on the meta
    device: shapes only, no memory and no time, so at any resolution (`--count_flops 2`)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, loss_of = torch_unet_and_loss(args, device="meta")
    with FlopCounterMode(display=False) as counter:
        for rows in reference_passes(args):
            loss_of(rows).backward()
    return dict(benchmark="train_step_flops", resolution=args.resolution, flops_per_step=counter.get_total_flops(),
                split_prior_batch=bool(args.split_prior_batch), gradient_checkpointing=bool(args.gradient_checkpointing))


def run_torch(args):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    unet, loss_of = torch_unet_and_loss(args)
    build_s = time.perf_counter() - t0
    common.progress(stage="built", build_s=round(build_s, 1))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate(args), betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def step():
        loss = 0.0
        for rows in reference_passes(args):
            part = loss_of(rows)
            part.backward()
            loss += float(part.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    rss_model = common.rss_gib()
    times, cpu, flops = [], [], None
    for i in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        if i == 1 and args.count_flops:  # counted on a warm step; timing of this step is kept apart
            with FlopCounterMode(display=False) as counter:
                loss = step()
            flops = counter.get_total_flops()
            flop_step_s = time.perf_counter() - start
            common.progress(stage="flop count", flops=flops, seconds=round(flop_step_s, 2))
            start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        common.progress(stage=f"step {i}", seconds=round(times[-1], 2), loss=loss, peak=round(common.peak_rss_gib(), 2))
    return dict(build_s=build_s, times=times, cpu_times=cpu, rss_after_build_gib=rss_model, loss=loss, flops_per_step=flops,
                trained_params=int(sum(p.numel() for p in params)), finetune=args.finetune, attention="SDPA (diffusers AttnProcessor2_0)")


def main():
    p = common.benchmark_parser(__doc__.split("\n\n")[0])
    p.add_argument("--finetune", choices=["lora", "full"], default="lora",
                   help="LoRA (rank 4) or every UNet weight (train_dreambooth.py's --finetune)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compile_in_child", type=int, default=1,
                   help="MindSpore GRAPH: compile the step graphs in a child and load them (train_dreambooth.py's default on CPU)")
    p.add_argument("--split_prior_batch", type=int, default=0,
                   help="the instance and the class sample as two forward/backward passes (train_dreambooth.py's --split_prior_batch)")
    p.add_argument("--gradient_checkpointing", type=int, default=0,
                   help="recompute each UNet block's forward in the backward: diffusers' unet.enable_gradient_checkpointing(), "
                        "MindBooth's UNetModel.enable_gradient_checkpointing() (train_dreambooth.py's --gradient_checkpointing)")
    p.add_argument("--gradient_checkpointing_res_blocks", type=int, default=0,
                   help="MindSpore, with --gradient_checkpointing: recompute the ResBlocks too (train_dreambooth.py's option)")
    p.add_argument("--context_projections", type=int, default=1,
                   help="MindSpore: the text's frozen cross-attention keys/values computed once, as train_dreambooth.py does (0: in every step)")
    args = p.parse_args()
    if args.count_flops == 2:  # counted on the meta device, nothing run
        common.emit(count_flops_on_meta(args))
        return
    common.run_benchmark(args, __file__, "train_step", run_mindspore, run_torch)


if __name__ == "__main__":
    main()

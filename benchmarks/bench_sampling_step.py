"""Benchmark: one denoising step with classifier-free guidance (batch 2 through the UNet) of a full-size
UNet (`--model` sdxl, ssd-1b, sd1.5 or if-i-xl; random weights, fp32, CPU).

    python benchmarks/bench_sampling_step.py --framework mindspore --mode graph --resolution 512
    python benchmarks/bench_sampling_step.py --framework mindspore --mode graph --resolution 512 --frozen_dtype fp16
    python benchmarks/bench_sampling_step.py --framework torch --resolution 512          # jemalloc (--allocator)
    python benchmarks/bench_sampling_step.py --framework mindspore --model if-i-xl --resolution 64 --frozen_dtype fp16

MindBooth: `DenoiseCell` of mindbooth/pipeline.py (denoiser + UNet), the engine of the inference config.
Reference: the UNet call of diffusers' StableDiffusionXLPipeline's loop (UNet2DConditionModel, SDPA,
torch.no_grad, latent_model_input = cat([latents] * 2); IF: IFPipeline's UNet call); the scheduler step and CFG mix are a few
element-wise ops on a 4-channel latent and are left out of both. Prints one `RESULT {json}` line."""
import time

import numpy as np

import common
from bench_train_step import batch_arrays, mindspore_vector, reference_added_cond


def run_mindspore(args):
    import mindspore as ms

    from mindbooth.context_projections import ContextProjections
    from mindbooth.if_cascade import UNetCall
    from mindbooth.pipeline import DenoiseCell

    engine, build_s = common.build_mindspore_engine(args, train=False)
    engine.set_train(False)
    arrays = batch_arrays(args.resolution, args.model)
    unet = engine.model.diffusion_model
    if hasattr(unet, "context_projections"):  # SD/SDXL: the denoiser's call, as Text2Image makes it
        cell = DenoiseCell(engine)
        inputs = [ms.Tensor(arrays["noise"] * 14.6), ms.Tensor(np.array([14.6, 14.6], np.float32)),
                  ms.Tensor(arrays["crossattn"]), ms.Tensor(mindspore_vector(arrays))]
        start = time.perf_counter()  # once per sampling call, as Text2Image does (timed apart)
        inputs.append(ContextProjections(unet)(inputs[2]))
        common.progress(stage="context projections", seconds=round(time.perf_counter() - start, 2))
    else:  # IF stage I: the UNet call of if_cascade.sample_stage (its DDPM step is a few element-wise ops)
        cell = UNetCall(unet, with_noise_level=False)
        inputs = [ms.Tensor(arrays["noise"]), ms.Tensor(np.array([999, 999], np.int64)), ms.Tensor(arrays["crossattn"]), None]
    cell.set_train(False)
    rss_model = common.rss_gib()
    times, cpu = [], []
    for i in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        cell(*inputs).asnumpy()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        common.progress(stage=f"step {i}", seconds=round(times[-1], 2), peak=round(common.peak_rss_gib(), 2))
    profile = common.profile_op_types(lambda: cell(*inputs).asnumpy()) if args.profile_ops else None
    return dict(build_s=build_s, times=times, cpu_times=cpu, rss_after_build_gib=rss_model, profile_ops=profile)


def run_torch(args):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    t0 = time.perf_counter()
    unet = common.diffusers_unet(args.model, train="", transformer_depth=args.transformer_depth).eval()
    build_s = time.perf_counter() - t0
    common.progress(stage="built", build_s=round(build_s, 1))
    tensors = {k: torch.from_numpy(v) for k, v in batch_arrays(args.resolution, args.model).items()}
    x, hidden, cond = tensors["noise"], tensors["crossattn"], reference_added_cond(tensors)
    t = torch.tensor(999)
    rss_model = common.rss_gib()
    times, cpu, flops = [], [], None
    with torch.no_grad():
        for i in range(args.steps):
            if i == 1 and args.count_flops:
                with FlopCounterMode(display=False) as counter:
                    unet(x, t, hidden, added_cond_kwargs=cond)
                flops = counter.get_total_flops()
            start, cpu_start = time.perf_counter(), time.process_time()
            unet(x, t, hidden, added_cond_kwargs=cond).sample.numpy()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            common.progress(stage=f"step {i}", seconds=round(times[-1], 2), peak=round(common.peak_rss_gib(), 2))
    return dict(build_s=build_s, times=times, cpu_times=cpu, rss_after_build_gib=rss_model, flops_per_step=flops,
                attention="SDPA (diffusers AttnProcessor2_0)")


def main():
    p = common.benchmark_parser(__doc__.split("\n\n")[0])
    common.run_benchmark(p.parse_args(), __file__, "sampling_step_cfg", run_mindspore, run_torch)


if __name__ == "__main__":
    main()

"""DeepFloyd IF from the command line (demo/sampling_without_streamlit.py picks it when --config's network is IFUNet):

    python demo/sampling_without_streamlit.py --config configs/inference/if_i_xl.yaml --weight checkpoints/if_i_xl.ckpt \
        --stage2_config configs/inference/if_ii_l.yaml --stage2_weight checkpoints/if_ii_l.ckpt \
        --prompt "a photo of a corgi" --device_target CPU

One stage in memory at a time: T5 encodes every prompt and is freed, stage I samples every prompt at 64x64 and is
freed, then stage II upscales each to 256x256. Each prompt's noise comes from --seed (stage I, then stage II, in
diffusers' order), so a prompt gives the image mindbooth.if_cascade.cascade gives with seeded_noise(seed).
--sample_step/--guidance_scale set stage I (default: its sampler_config); --stage2_sample_step stage II's steps
(default: its sampler_config, as its guidance scale and noise_level).
`--weight base.ckpt,lora.ckpt` samples stage I with a DreamBooth LoRA (train_dreambooth.py's *_lora.ckpt), scaled by
--lora_scale. Stage III (1024x1024) is left out.
"""
import gc
from pathlib import Path

import mindspore as ms
import numpy as np
from PIL import Image

from mindbooth import if_cascade
from mindbooth.images import make_grid, to_uint8
from mindbooth.sampling_cli import StepProgress, refuse_size_flags, safe_stem, sampling_parser, save_png, validate
from mindbooth.sampling_model import model_name, native_resolution, size_multiple, split_weights
from mindbooth.validation import UsageError, load_yaml_config


def _check_options(args, config, weights):
    """What IF here does not take, refused with the flag to drop; the stage-II config checked before any load."""
    name = model_name(config)
    refuse_size_flags(args, name)
    if args.task != "txt2img":
        raise UsageError(f"{name}: only --task txt2img is supported for DeepFloyd IF")
    if args.init_latent_path:
        raise UsageError(f"{name}: --init_latent_path is for latent models; IF starts from --seed's pixel noise")
    if args.sampler != sampling_parser().get_default("sampler"):
        raise UsageError(f"{name} samples with its DDPM sampler (sampler_config in {args.config}): drop --sampler")
    if args.stage2_sample_step is not None and args.stage2_sample_step < 1:
        raise UsageError("--stage2_sample_step must be at least 1")
    if args.stage2_sample_step is not None and not args.stage2_config:
        raise UsageError("--stage2_sample_step needs --stage2_config (stage II)")
    if bool(args.stage2_config) != bool(args.stage2_weight):
        raise UsageError("give --stage2_config and --stage2_weight together (stage II's config and its weights)")
    if args.width is not None and args.height is not None and args.width != args.height:
        raise UsageError(f"{name} samples square images here: give one of --width/--height or equal values")
    stage_two = None
    if args.stage2_config:
        stage_two = load_yaml_config(Path(args.stage2_config), "--stage2_config")
        if not if_cascade.is_if_config(stage_two) or stage_two.model.params.get("conditioner_config") != "__is_unconditional__":
            raise UsageError(f"--stage2_config {args.stage2_config} is not a DeepFloyd IF stage-II config "
                             "(an IFUNet engine without a text encoder, e.g. configs/inference/if_ii_l.yaml)")
        if not Path(args.stage2_weight).is_file():
            raise UsageError(f"--stage2_weight not found: {args.stage2_weight}")
    if not (config.model.params.get("conditioner_config") or {}).get("target"):
        raise UsageError(f"--config {args.config} has no text encoder: give the stage-I config (e.g. if_i_xl.yaml)")
    return stage_two


def _free(engine):
    del engine
    gc.collect()


def generate_and_save_if(args, config):
    """Validate, encode, sample stage I (and stage II), save the images and a grid. Returns the paths."""
    weights = split_weights(args.weight)
    stage_two_config = _check_options(args, config, weights)
    sampler = config.model.params.sampler_config.params
    if args.sample_step is None:
        args.sample_step = int(sampler.get("num_steps", 100))
    if args.guidance_scale is None:
        args.guidance_scale = float(sampler.get("guidance_scale", 7.0))
    native = native_resolution(config)
    prompts, num_images, size, _, _, _ = validate(args, size_multiple(config), 1, native, False, model_name(config))
    if not weights:
        raise UsageError("--weight not found: (none given)")
    for weight in weights:
        if not Path(weight).is_file():
            raise UsageError(f"--weight not found: {weight}")

    ms.set_context(mode=ms.GRAPH_MODE if args.ms_mode == 0 else ms.PYNATIVE_MODE, jit_config={"jit_level": args.jit_level})
    ms.set_device(args.device_target)
    flat = [prompt for prompt in prompts for _ in range(num_images)]
    embeds, negative = if_cascade.encode_prompts(args.config, weights[0], flat, [args.negative_prompt] * len(flat))
    noises = [if_cascade.seeded_noise(args.seed) for _ in prompts]  # one stream per prompt, stage I then stage II
    rows = [slice(i * num_images, (i + 1) * num_images) for i in range(len(prompts))]

    def run_stage(config_path, weight, inputs, label, **options):
        engine = if_cascade.load_stage(config_path, weight, options.get("lora_scale", 1.0))
        out = []
        try:
            for i, row in enumerate(rows):
                steps = options.get("num_steps") or sampler_steps(engine)
                progress = StepProgress(f"{label} prompt {i + 1}/{len(prompts)}", steps)
                try:
                    out.append(if_cascade.sample_stage(engine, embeds[row], negative[row], options["size"], noises[i],
                                                       options.get("num_steps"), options.get("guidance_scale"),
                                                       low_res=None if inputs is None else inputs[i], callback=progress))
                finally:
                    progress.close()
        finally:
            _free(engine)
        return out

    images = run_stage(args.config, weights, None, "stage I", size=size, num_steps=args.sample_step,
                       guidance_scale=args.guidance_scale, lora_scale=args.lora_scale)
    stage_two = {}
    if stage_two_config is not None:
        size_two = size * native_resolution(stage_two_config) // native
        images = run_stage(args.stage2_config, args.stage2_weight, images, "stage II", size=size_two,
                           num_steps=args.stage2_sample_step)
        stage_two = {"stage2_weight": Path(args.stage2_weight).name, "stage2_size": size_two,
                     **({"stage2_sample_step": args.stage2_sample_step} if args.stage2_sample_step else {})}
        size = size_two
    common = {"negative_prompt": args.negative_prompt, "sample_step": args.sample_step,
              "guidance_scale": args.guidance_scale, "width": size, "height": size, "seed": args.seed,
              "weights": [Path(w).name for w in weights], "task": args.task, **stage_two}
    save_path = Path(args.save_path)
    all_images, paths = [], []
    for prompt, stage_images in zip(prompts, images):
        pixels = to_uint8(stage_images)
        if not np.isfinite(stage_images).all():
            raise FloatingPointError("sampling produced NaN/Inf; check the weights")
        for number, image in enumerate(pixels):
            parameters = {"prompt": prompt, "image": number, **common}
            paths.append(save_png(Image.fromarray(image), save_path, f"{safe_stem(prompt)}-s{args.seed}-{number}", parameters))
        all_images.append(pixels)
    grid_stem = safe_stem(Path(args.prompt).stem if len(prompts) > 1 else prompts[0])
    paths.append(save_png(make_grid(np.concatenate(all_images), args.num_cols), save_path, f"{grid_stem}-grid",
                          {"prompts": prompts, **common}))
    return paths


def sampler_steps(engine) -> int:
    """The number of steps the engine's sampler_config takes (for the progress bar)."""
    return int(engine.sampler_config["params"]["num_steps"])

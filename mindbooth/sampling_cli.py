"""Command-line sampling with MindONE's `demo/sampling_without_streamlit.py` flags, and the pieces the
Streamlit demo shares with it: the SDXL aspect-ratio table, prompt files, safe output names, saving.

Images go to --save_path only, under names made from the prompt (sanitised, never overwriting a file).
"""
import argparse
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import mindspore as ms
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from mindbooth.config import add_allocator_flag
from mindbooth.if_cascade import is_if_config
from mindbooth.images import load_rgb, make_grid
from mindbooth.pipeline import SAMPLERS
from mindbooth.sampling_model import (load_sampling_model, model_name, native_resolution, size_conditioned, size_multiple,
                                      split_weights)
from mindbooth.validation import UsageError, bounded_int, finite_float, load_yaml_config, prompt_token_notes

# MindONE's table (sgm's SD_XL_BASE_RATIOS plus 1.0_768 / 1.0_512): ratio -> (width, height)
SD_XL_BASE_RATIOS = {
    "0.5": (704, 1408), "0.52": (704, 1344), "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216),
    "0.72": (832, 1152), "0.78": (896, 1152), "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024),
    "1.0": (1024, 1024), "1.0_768": (768, 768), "1.0_512": (512, 512), "1.07": (1024, 960), "1.13": (1088, 960),
    "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832), "1.67": (1280, 768),
    "1.75": (1344, 768), "1.91": (1344, 704), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "2.89": (1664, 576), "3.0": (1728, 576),
}
DEFAULT_PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
DEFAULT_SAMPLE_STEP, DEFAULT_GUIDANCE_SCALE = 40, 5.0
MAX_STEM_CHARS = 60


def sampling_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Sample SDXL, SSD-1B, SD 1.5, SD 2.1 (+ LoRA) or DeepFloyd IF images with MindSpore.")
    add = parser.add_argument
    add("--task", default="txt2img", choices=["txt2img", "img2img"])
    add("--config", default="configs/inference/sd_xl_base.yaml", help="model YAML (inference or training config)")
    add("--weight", default="checkpoints/sd_xl_base_1.0_ms.ckpt", help="base .ckpt[,LoRA .ckpt,...]: base first")
    add("--prompt", default=DEFAULT_PROMPT, help="the prompt, or a .txt file with one prompt per line")
    add("--negative_prompt", default="", help="text for the unconditional branch (empty: SDXL base zeroes its text embeddings)")
    add("--sampler", default="EulerEDMSampler", help=f"one of {', '.join(SAMPLERS)}")
    add("--guidance_scale", type=float, default=None, help="classifier-free guidance; 1 or less turns it off "
        f"(default {DEFAULT_GUIDANCE_SCALE}; DeepFloyd IF: its config's sampler_config)")
    add("--sample_step", type=int, default=None,
        help=f"sampling steps (default {DEFAULT_SAMPLE_STEP}; DeepFloyd IF: its config's sampler_config)")
    add("--sd_xl_base_ratios", default=None, help="size-conditioned models (SDXL, SSD-1B): aspect ratio (width/height) from "
        f"SDXL's table: {', '.join(SD_XL_BASE_RATIOS)} (default: the model's native_resolution, square)")
    add("--width", type=int, default=None, help="output width (overrides --sd_xl_base_ratios; default: the model's native_resolution)")
    add("--height", type=int, default=None, help="output height (overrides --sd_xl_base_ratios; default: the model's native_resolution)")
    add("--orig_width", type=int, default=None, help="size conditioning: original width (default: output width)")
    add("--orig_height", type=int, default=None)
    add("--target_width", type=int, default=None, help="size conditioning: target width (default: output width)")
    add("--target_height", type=int, default=None)
    add("--crop_coords_top", type=int, default=None, help="size conditioning: crop top (default 0)")
    add("--crop_coords_left", type=int, default=None)
    add("--num_cols", type=int, default=1, help="grid columns; also the images per prompt when --num_images is not given")
    add("--num_images", type=int, default=None, help="images per prompt (one batch)")
    add("--seed", type=int, default=42, help="same seed, same image (every prompt starts from this seed's noise)")
    add("--init_latent_path", default=None, help=".npy standard-normal initial latent (num_images, 4, H/8, W/8), used instead of the seed's draw")
    add("--lora_scale", type=float, default=1.0, help="scale of the LoRA contribution (0: the base model)")
    add("--save_path", default="outputs/demo/", help="output folder (nothing is written outside it)")
    add("--img", default=None, help="img2img: the input image")
    add("--strength", type=float, default=0.75, help="img2img: how much to change the input, in (0, 1]")
    add("--stage2_config", default=None, help="DeepFloyd IF (a --config whose network is IFUNet): the stage-II "
        "config (e.g. configs/inference/if_ii_l.yaml) to upscale stage I's 64x64 to 256x256; without it only stage I "
        "is sampled. Stage III (1024x1024) is not supported")
    add("--stage2_weight", default=None, help="DeepFloyd IF: the stage-II weights (with --stage2_config)")
    add("--stage2_sample_step", type=int, default=None, help="DeepFloyd IF: stage-II steps (default: its sampler_config)")
    add("--device_target", default="Ascend", choices=["Ascend", "GPU", "CPU"])
    add("--ms_mode", type=int, default=0, choices=[0, 1], help="0: GRAPH_MODE (compiles once, then fast), 1: PYNATIVE_MODE")
    add("--jit_level", default="O0", choices=["O0", "O1", "O2"], help="GRAPH_MODE optimisation level")
    add_allocator_flag(add)
    return parser


def read_prompts(value: str) -> list:
    """A prompt, or the non-empty lines of a .txt file."""
    path = Path(value)
    if path.suffix.lower() == ".txt" and (path.is_file() or not re.search(r"\s", value)):
        if not path.is_file():
            raise UsageError(f"prompt file not found: {value}")
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"prompt file {value} is not UTF-8 text") from None
        if not prompts:
            raise UsageError(f"prompt file {value} has no prompts (one per line)")
        return prompts
    if not value.strip():
        raise UsageError("the prompt is empty")
    return [value]


def safe_stem(text: str, max_chars: int = MAX_STEM_CHARS) -> str:
    """A file-name stem from free text: letters, digits, '_' and '-' only (no separators, no dots, so no
    '..'), at most `max_chars`, never empty and never starting with '-'."""
    text = unicodedata.normalize("NFKC", text)
    stem = re.sub(r"[^\w-]+", "_", text, flags=re.UNICODE)
    stem = re.sub(r"_+", "_", stem).strip("_-")[:max_chars].strip("_-")
    return stem or "image"


def write_new_file(folder, stem: str, suffix: str, write_fn) -> Path:
    """Write through a temporary file, then publish it under `stem+suffix` or, if that exists,
    `stem-1+suffix`, `stem-2+suffix`, ...: an existing file (or link) is never replaced, even by a concurrent writer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{stem}.tmp.", suffix=suffix)
    os.close(handle)
    try:
        write_fn(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        for index in range(100000):
            target = folder / (f"{stem}{suffix}" if index == 0 else f"{stem}-{index}{suffix}")
            try:
                _publish(temporary, target)
                return target
            except FileExistsError:
                continue
        raise FileExistsError(f"no free file name for {stem}{suffix} in {folder}")
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _publish(temporary, target: Path):
    """Give `temporary` the name `target` only if no such name exists (atomic)."""
    try:
        os.link(temporary, target)  # fails with FileExistsError if the name is taken, link or not
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: reserve the name exclusively, then replace
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(temporary, target)


def save_png(image: Image.Image, folder, stem: str, parameters: dict = None) -> Path:
    """Save as PNG under a new name in `folder`; `parameters` go into the PNG's text ("parameters", JSON)."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", json.dumps(parameters, ensure_ascii=False))
    return write_new_file(folder, stem, ".png", lambda temporary: image.save(temporary, format="PNG", pnginfo=info))


def output_size(width, height, ratio, multiple: int, native: int = 1024):
    """(width, height): explicit values win; one alone keeps the ratio's aspect (square without a ratio);
    otherwise the ratio table, or without a ratio the model's native resolution `native`, square."""
    if ratio is None:
        width, height = (width or height or native), (height or width or native)
        ratio = "1.0"
    if ratio not in SD_XL_BASE_RATIOS:
        raise UsageError(f"unknown --sd_xl_base_ratios {ratio!r}; choose one of {', '.join(SD_XL_BASE_RATIOS)}")
    table_width, table_height = SD_XL_BASE_RATIOS[ratio]
    if width is None and height is None:
        width, height = table_width, table_height
    elif height is None:
        height = max(multiple, round(width * table_height / table_width / multiple) * multiple)
    elif width is None:
        width = max(multiple, round(height * table_width / table_height / multiple) * multiple)
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            raise UsageError(f"--{name} {value} must be a positive multiple of {multiple} for this model")
    return width, height


def load_init_image(path, width, height, multiple: int):
    """img2img input -> ((3, H, W) float32 in [-1, 1], W, H). Resized to --width/--height if given, else
    to its own size rounded down to a multiple of `multiple`."""
    if not Path(path).is_file():
        raise UsageError(f"--img not found: {path}")
    try:
        image = load_rgb(path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if width is None and height is None:
        width, height = (max(multiple, side - side % multiple) for side in image.size)
    elif width is None or height is None:
        raise UsageError("img2img: give both --width and --height, or neither (the input image's size is used)")
    if image.size != (width, height):
        print(f"img2img: resizing {path} from {image.size[0]}x{image.size[1]} to {width}x{height}")
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return array, width, height


def load_init_latent(path, shape: tuple) -> np.ndarray:
    if not Path(path).is_file():
        raise UsageError(f"--init_latent_path not found: {path}")
    try:
        latent = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise UsageError(f"--init_latent_path {path} is not a .npy array: {error}") from None
    if tuple(latent.shape) != tuple(shape):
        raise UsageError(f"--init_latent_path {path} has shape {tuple(latent.shape)}, expected {tuple(shape)} "
                         "(num_images, 4, height/8, width/8)")
    if not np.issubdtype(latent.dtype, np.floating) or not np.isfinite(latent).all():
        raise UsageError(f"--init_latent_path {path} must hold finite floating-point numbers")
    return latent.astype(np.float32)


def size_options(args) -> dict:
    """SDXL's size conditioning from the flags that were given (the pipeline defaults the rest)."""
    options = {"orig_width": args.orig_width, "orig_height": args.orig_height, "target_width": args.target_width,
               "target_height": args.target_height, "crop_top": args.crop_coords_top, "crop_left": args.crop_coords_left}
    return {k: v for k, v in options.items() if v is not None}


class StepProgress:
    """tqdm over the sampler's steps, fed by the pipeline's per-step callback."""

    def __init__(self, description: str, total: int):
        self.bar = tqdm(desc=description, total=total, unit="step")

    def __call__(self, info: dict):
        if self.bar.total != info["total"]:
            self.bar.total = info["total"]
        self.bar.update(1)

    def close(self):
        self.bar.close()


def expected_steps(args) -> int:
    """Steps the sampler will take: img2img at strength s keeps max(int(s * (steps + 1)), 1) noise levels."""
    if args.task == "img2img":
        return max(int(args.strength * (args.sample_step + 1)), 1) - 1
    return args.sample_step


SIZE_FLAGS = ("sd_xl_base_ratios", "orig_width", "orig_height", "target_width", "target_height", "crop_coords_top",
              "crop_coords_left")


def refuse_size_flags(args, model: str):
    """SD 1.x/2.x have no size conditioning (and SDXL's ratio table is not their size set): a flag for it is a mistake."""
    given = [flag for flag in SIZE_FLAGS if getattr(args, flag) is not None]
    if given:
        what = "SDXL's aspect-ratio table" if given[0] == "sd_xl_base_ratios" else "SDXL's size conditioning"
        raise UsageError(f"--{given[0]} is {what}, which {model} does not have (only SDXL/SSD-1B models do): "
                         "drop it and set the size with --width/--height")


def validate(args, multiple: int, factor: int, native: int = 1024, with_size_conditioning: bool = True, model: str = "this model"):
    """Everything that can be checked before the (slow) model load. Returns the prompts, size and inputs.
    `native`: the default side; without `with_size_conditioning`, the size-conditioning flags are refused."""
    if not with_size_conditioning:
        refuse_size_flags(args, model)
    if args.sample_step is None:
        args.sample_step = DEFAULT_SAMPLE_STEP
    if args.guidance_scale is None:
        args.guidance_scale = DEFAULT_GUIDANCE_SCALE
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    finite_float(args.guidance_scale, "--guidance_scale")
    finite_float(args.lora_scale, "--lora_scale")
    finite_float(args.strength, "--strength")
    bounded_int(args.seed, "--seed", 0, 2**32 - 1)
    for flag in ("sample_step", "num_cols"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    num_images = args.num_cols if args.num_images is None else args.num_images
    if num_images < 1:
        raise UsageError("--num_images must be at least 1")
    prompts = read_prompts(args.prompt)
    named = {f"--prompt{f' (line {i + 1})' if len(prompts) > 1 else ''}": prompt for i, prompt in enumerate(prompts)}
    for note in prompt_token_notes({**named, "--negative_prompt": args.negative_prompt}):
        print(note)
    init_image = None
    if args.task == "img2img":
        if not args.img:
            raise UsageError("--task img2img needs --img path/to/image")
        if not 0.0 < args.strength <= 1.0:
            raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
        init_image, width, height = load_init_image(args.img, args.width, args.height, multiple)
    else:
        if args.img:
            raise UsageError("--img is only used with --task img2img")
        width, height = output_size(args.width, args.height, args.sd_xl_base_ratios, multiple, native)
    init_latent = None
    if args.init_latent_path:
        init_latent = load_init_latent(args.init_latent_path, (num_images, 4, height // factor, width // factor))
    save_path = Path(args.save_path)
    if save_path.exists() and not save_path.is_dir():
        raise UsageError(f"--save_path {save_path} exists and is not a folder")
    return prompts, num_images, width, height, init_image, init_latent


_loaded = {"model": None, "runtime": None}  # the last model, reused by in-process calls with the same config and base


def generate_and_save(args):
    """Validate, load (or reuse) the model, sample every prompt, save images and a grid. Returns the paths."""
    config_path = Path(args.config)
    config = load_yaml_config(config_path, "--config")
    if is_if_config(config):
        from mindbooth.if_sampling import generate_and_save_if  # DeepFloyd IF: its own two-stage path

        return generate_and_save_if(args, config)
    for flag in ("stage2_config", "stage2_weight", "stage2_sample_step"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} is for DeepFloyd IF configs; {model_name(config)} has no second stage")
    prompts, num_images, width, height, init_image, init_latent = validate(
        args, size_multiple(config), int(config.model.params.get("latents_per_pixel", 8)), native_resolution(config),
        size_conditioned(config), model_name(config))
    weights = split_weights(args.weight)

    ms.set_context(mode=ms.GRAPH_MODE if args.ms_mode == 0 else ms.PYNATIVE_MODE, jit_config={"jit_level": args.jit_level})
    ms.set_device(args.device_target)
    runtime = (args.ms_mode, args.device_target)
    reuse = _loaded["model"] if _loaded["runtime"] == runtime else None
    model = load_sampling_model(config_path, weights, args.lora_scale, reuse=reuse)
    _loaded.update(model=model, runtime=runtime)

    save_path = Path(args.save_path)
    init_images = None if init_image is None else np.repeat(init_image[None], num_images, axis=0)
    common = {
        "negative_prompt": args.negative_prompt, "sampler": args.sampler, "sample_step": args.sample_step,
        "guidance_scale": args.guidance_scale, "width": width, "height": height, "seed": args.seed,
        "weights": [Path(w).name for w in weights], "lora_scale": args.lora_scale, "task": args.task,
        **({"strength": args.strength} if args.task == "img2img" else {}), **size_options(args),
    }
    all_images, paths = [], []
    for index, prompt in enumerate(prompts):
        progress = StepProgress(f"prompt {index + 1}/{len(prompts)}", expected_steps(args))
        try:
            images = model.generate(
                prompts=[prompt] * num_images, negative_prompts=[args.negative_prompt] * num_images, width=width, height=height,
                num_steps=args.sample_step, guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed,
                init_noise=init_latent, init_images=init_images, strength=args.strength if init_images is not None else 1.0,
                size_options=size_options(args), callback=progress)
        finally:
            progress.close()
        stem = safe_stem(prompt)
        for number, image in enumerate(images):
            parameters = {"prompt": prompt, "image": number, **common}
            paths.append(save_png(Image.fromarray(image), save_path, f"{stem}-s{args.seed}-{number}", parameters))
        all_images.append(images)
    grid_stem = safe_stem(Path(args.prompt).stem if len(prompts) > 1 else prompts[0])
    grid = make_grid(np.concatenate(all_images), args.num_cols)
    paths.append(save_png(grid, save_path, f"{grid_stem}-grid", {"prompts": prompts, **common}))
    return paths


def fail(message: str):
    raise SystemExit(f"error: {message}")


def main(argv=None):
    args = sampling_parser().parse_args(argv)
    try:
        paths = generate_and_save(args)
    except (UsageError, ValueError, FileNotFoundError, FloatingPointError) as error:
        fail(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    for path in paths:
        print(f"saved {path}")
    return paths

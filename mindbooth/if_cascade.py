"""DeepFloyd IF text-to-image, stage I -> stage II, as diffusers' IFPipeline + IFSuperResolutionPipeline:

1. prompt embeddings: T5 encodes the prompts and negative prompts once, then is freed (the 4.76B encoder never sits
   next to the UNets: `encode_prompts` builds it alone, `load_stage` builds a UNet engine without it);
2. stage I at its native 64x64 from noise, classifier-free guidance, dynamic thresholding (the engine's sampler_config);
3. stage II at 256x256: stage I's image upscaled bilinearly (align_corners, as IFSuperResolutionPipeline), noised to
   `noise_level` with the stage-II sampler's add_noise, joined to x on the channel axis, the noise level passed as
   class_labels, guidance and thresholding as in stage I.
Stage III (the x4 latent upscaler to 1024x1024) is left out.

Randomness comes from `noise(shape) -> standard normal float32`, drawn in diffusers' order: stage I's start, its step
noises; stage II's start, the upscaled image's noise, its step noises.
"""
import gc

import mindspore as ms
import numpy as np
from mindspore import nn

from gm.util import instantiate_from_config
from mindbooth import checkpoint
from mindbooth.config import load_config

IF_UNET = "gm.modules.diffusionmodules.if_unet.IFUNet"


def is_if_config(config) -> bool:
    """Whether an engine config (a loaded YAML) is a DeepFloyd IF stage (its network is IFUNet)."""
    network = (config.get("model") or {}).get("params", {}).get("network_config") or {}
    return network.get("target") == IF_UNET


def seeded_noise(seed: int):
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(tuple(shape)).astype(np.float32)


def upscale_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, C, h, w) -> (N, C, height, width), bilinear with align_corners=True (torch's F.interpolate as
    IFSuperResolutionPipeline calls it: the corner pixels of both grids coincide)."""
    _, _, h, w = images.shape

    def grid(out, size):
        position = np.arange(out, dtype=np.float64) * ((size - 1) / (out - 1) if out > 1 else 0.0)
        low = np.clip(np.floor(position).astype(np.int64), 0, size - 1)
        high = np.minimum(low + 1, size - 1)
        return low, high, (position - low)

    y0, y1, fy = grid(height, h)
    x0, x1, fx = grid(width, w)
    rows = images[:, :, y0, :] * (1 - fy)[:, None] + images[:, :, y1, :] * fy[:, None]
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(np.float32)


class UNetCall(nn.Cell):
    """One UNet call as a Cell, so GRAPH_MODE compiles it once for all steps."""

    def __init__(self, unet, with_noise_level: bool):
        super().__init__(auto_prefix=False)
        self.unet = unet
        self.with_noise_level = with_noise_level

    def construct(self, x, t, context, class_labels):
        if self.with_noise_level:
            return self.unet(x, t, context, class_labels)
        return self.unet(x, t, context)


def prompt_embeddings(conditioner, prompts, negative_prompts):
    """(positive, negative) T5 embeddings (N, L, D) as numpy: what IF's pipelines call prompt_embeds and
    negative_prompt_embeds (an empty negative prompt is encoded like any other text, as IF does)."""
    conditioner.set_train(False)
    encode = lambda texts: conditioner.encode({"txt": list(texts)})["crossattn"].asnumpy()  # noqa: E731
    return encode(prompts), encode(negative_prompts)


def sample_stage(engine, embeds, negative_embeds, size, noise, num_steps=None, guidance_scale=None, low_res=None,
                 noise_level=None, callback=None) -> np.ndarray:
    """One IF stage with the engine's sampler_config (num_steps / guidance_scale / noise_level override it).
    `low_res` (N, 3, h, w) in [-1, 1]: stage II's input image, upscaled to `size` and noised here. Returns the
    images (N, 3, size, size) in about [-1, 1]."""
    sampler = instantiate_from_config(engine.sampler_config)
    unet = engine.model.diffusion_model
    count = embeds.shape[0]
    x = noise((count, 3, size, size))
    concat, labels = None, None
    if low_res is not None:
        level = sampler.noise_level if noise_level is None else int(noise_level)
        if level is None:
            raise ValueError("this engine's sampler_config has no noise_level: is it a stage-II config?")
        upscaled = upscale_bilinear(np.asarray(low_res, np.float32), size, size)
        concat = sampler.add_noise(upscaled, noise(upscaled.shape), level)
        labels = np.full((count,), level, np.int64)
    guided = (sampler.guidance_scale if guidance_scale is None else guidance_scale) > 1.0
    context = np.concatenate([negative_embeds, embeds]) if guided else embeds
    call = UNetCall(unet, low_res is not None)
    engine.set_train(False)

    def network(x_in, t):
        copies = x_in.shape[0] // count
        if concat is not None:
            x_in = np.concatenate([x_in, np.concatenate([concat] * copies)], axis=1)
        class_labels = None if labels is None else ms.Tensor(np.concatenate([labels] * copies))
        timesteps = ms.Tensor(np.full((x_in.shape[0],), t, np.int64))
        return call(ms.Tensor(x_in, ms.float32), timesteps, ms.Tensor(context, ms.float32), class_labels).asnumpy()

    return sampler(network, x, lambda like: noise(like.shape), num_steps, guidance_scale, callback)


def cascade(stage_one, stage_two, embeds, negative_embeds, noise, size_one=None, size_two=None, num_steps=None,
            guidance_scale=None, stage_two_steps=None, stage_two_guidance=None, noise_level=None, callback=None):
    """Stage I then (if `stage_two` is given) stage II on the same embeddings. Returns (stage I images,
    stage II images or None), float32 in about [-1, 1]. Sizes default to each engine's `native_resolution`
    attribute as `load_stage` sets it (64 and 256 at full size)."""
    size_one = size_one or stage_one.native_resolution
    low = sample_stage(stage_one, embeds, negative_embeds, size_one, noise, num_steps, guidance_scale,
                       callback=callback)
    if stage_two is None:
        return low, None
    size_two = size_two or stage_two.native_resolution
    high = sample_stage(stage_two, embeds, negative_embeds, size_two, noise, stage_two_steps, stage_two_guidance,
                        low_res=low, noise_level=noise_level, callback=callback)
    return low, high


class _TextEncoder(nn.Cell):
    """The stage-I conditioner alone, under the engine's names (conditioner.embedders.0.transformer.*)."""

    def __init__(self, conditioner):
        super().__init__()
        self.conditioner = conditioner


def encode_prompts(config_path, weight, prompts, negative_prompts):
    """Build stage I's T5 alone from `config_path`, load its names from `weight`, encode, free it. Returns
    (positive, negative) embeddings as numpy."""
    config = load_config(config_path)
    holder = _TextEncoder(instantiate_from_config(config.model.params.conditioner_config))
    if holder.conditioner is None:
        raise ValueError(f"{config_path} has no text encoder (conditioner_config): give the stage-I config")
    checkpoint.load_weights(holder, [weight], skip_prefixes=("model.",))
    try:
        return prompt_embeddings(holder.conditioner, prompts, negative_prompts)
    finally:
        del holder
        gc.collect()  # the 4.76B encoder is gone before a UNet is built


def load_stage(config_path, weight):
    """An IF engine for sampling: its UNet and sampler, never its text encoder (loaded and freed by encode_prompts;
    its names in `weight` are skipped). `engine.native_resolution` is the config's."""
    config = load_config(config_path)
    if not is_if_config(config):
        raise ValueError(f"{config_path} is not a DeepFloyd IF config (its network is not {IF_UNET})")
    params = config.model.params
    params.conditioner_config = "__is_unconditional__"
    engine = instantiate_from_config(config.model)
    checkpoint.load_weights(engine, [weight], skip_prefixes=("conditioner.",))
    engine.native_resolution = int(config.get("native_resolution") or params.network_config.params.sample_size)
    return engine

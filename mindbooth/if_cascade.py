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
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn
from omegaconf import DictConfig

from gm.modules.lora import lora_parameters
from gm.util import instantiate_from_config
from mindbooth import checkpoint
from mindbooth.config import load_config
from mindbooth.images import to_uint8
from mindbooth.text_embeddings import encode_alone, lookup

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
                 noise_level=None, callback=None, unet_call=None) -> np.ndarray:
    """One IF stage with the engine's sampler_config (num_steps / guidance_scale / noise_level override it).
    `low_res` (N, 3, h, w) in [-1, 1]: stage II's input image, upscaled to `size` and noised here. `unet_call`: a
    UNetCall of this engine kept by the caller, so GRAPH_MODE compiles it once over many calls. Returns the
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
    call = unet_call or UNetCall(unet, low_res is not None)
    engine.set_train(False)

    def network(x_in, t):
        copies = x_in.shape[0] // count
        if concat is not None:
            x_in = np.concatenate([x_in, np.concatenate([concat] * copies)], axis=1)
        class_labels = None if labels is None else ms.Tensor(np.concatenate([labels] * copies))
        timesteps = ms.Tensor(np.full((x_in.shape[0],), t, np.int64))
        return call(ms.Tensor(x_in, ms.float32), timesteps, ms.Tensor(context, ms.float32), class_labels).asnumpy()

    return sampler(network, x, lambda like: noise(like.shape), num_steps, guidance_scale, callback)


class StageText2Image:
    """Text2Image's interface (mindbooth/pipeline.py) on an IF stage-I engine, for the trainer's class images and
    sample grids: the engine's DDPM sampler at the asked (square) size, the negative prompt encoded like any text
    (as IF does), the noise drawn from `seed` (seeded_noise)."""

    def __init__(self, engine, text_embeddings: dict = None):
        """`text_embeddings`: an encode_alone table of the prompts (the engine was built without its T5)."""
        self.engine = engine
        self.unet_call = UNetCall(engine.model.diffusion_model, with_noise_level=False)
        self.text_embeddings = text_embeddings
        self.cached = {}

    def cache_prompts(self, prompts, width, height, guidance_scale):
        """Encode now what `__call__` will need later, so T5 can be freed."""
        negatives = ("",) * len(prompts)
        self.cached[(tuple(prompts), negatives)] = self._embeddings(prompts, negatives)

    def _embeddings(self, prompts, negative_prompts):
        if self.text_embeddings is not None:
            return lookup(self.text_embeddings, prompts)[0], lookup(self.text_embeddings, negative_prompts)[0]
        if self.engine.conditioner is None:
            raise ValueError("the text encoder was freed (cache_latents): only the cached prompts can be sampled")
        return prompt_embeddings(self.engine.conditioner, prompts, negative_prompts)

    def __call__(self, prompts, negative_prompts=None, width=64, height=64, num_steps=None, guidance_scale=None,
                 sampler="DDPMSampler", seed=42, callback=None):
        """Returns (N, H, W, 3) uint8 images."""
        if sampler != "DDPMSampler":
            raise ValueError(f"DeepFloyd IF samples with its DDPM sampler: set the sampler to DDPMSampler, not {sampler!r}")
        if width != height:
            raise ValueError(f"DeepFloyd IF samples square images here, got {width}x{height}")
        prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        negatives = ("",) * len(prompts) if negative_prompts is None else tuple(negative_prompts)
        key = (prompts, negatives)
        embeds, negative = self.cached[key] if key in self.cached else self._embeddings(prompts, negatives)
        images = sample_stage(self.engine, embeds, negative, width, seeded_noise(seed), num_steps, guidance_scale,
                              callback=callback, unet_call=self.unet_call)
        if not np.isfinite(images).all():
            raise FloatingPointError("sampling produced NaN/Inf; check the weights and the dtype")
        return to_uint8(images)


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


def encode_prompts(config_path, weight, prompts, negative_prompts):
    """Build stage I's T5 alone from `config_path`, load its names from `weight`, encode, free it
    (mindbooth/text_embeddings.py). Returns (positive, negative) embeddings as numpy."""
    config = load_config(config_path)
    if not isinstance(config.model.params.get("conditioner_config"), DictConfig):
        raise ValueError(f"{config_path} has no text encoder (conditioner_config): give the stage-I config")
    table = encode_alone(config.model.params.conditioner_config, weight, [*prompts, *negative_prompts])
    return lookup(table, prompts)[0], lookup(table, negative_prompts)[0]


def load_stage(config_path, weights, lora_scale: float = 1.0):
    """An IF engine for sampling: its UNet and sampler, never its text encoder (loaded and freed by encode_prompts;
    its names in the base file are skipped). `weights`: the base file, or [base, LoRA files...] (the LoRA goes on
    the config's lora_targets; its update scaled by `lora_scale`). `engine.native_resolution` is the config's."""
    config = load_config(config_path)
    if not is_if_config(config):
        raise ValueError(f"{config_path} is not a DeepFloyd IF config (its network is not {IF_UNET})")
    params = config.model.params
    params.conditioner_config = "__is_unconditional__"
    engine = instantiate_from_config(config.model)
    checkpoint.load_weights(engine, [weights] if isinstance(weights, (str, Path)) else list(weights),
                            skip_prefixes=("conditioner.",))
    if lora_scale != 1.0:  # on the B weights: the CPU backend's LoRA kernels fix LoRADense.scale when they are built
        for name, param in lora_parameters(engine).items():
            if ".lora_B." in name:
                param.set_data(param * lora_scale)
    engine.native_resolution = int(config.get("native_resolution") or params.network_config.params.sample_size)
    return engine

"""Text-to-image (and image-to-image) with a DiffusionEngine: conditioning, sampler, decoding.
Shared by class-image sampling, validation grids, the command-line sampler and the Streamlit demo."""
import mindspore as ms
import numpy as np
from mindspore import nn

from gm.util import instantiate_from_config
from mindbooth.context_projections import ContextProjections
from mindbooth.if_cascade import StageText2Image, is_if_config
from mindbooth.images import to_uint8

SAMPLERS = {
    "EulerEDMSampler": ("EulerEDMSampler", "LegacyDDPMDiscretization"),
    "HeunEDMSampler": ("HeunEDMSampler", "LegacyDDPMDiscretization"),
    "EulerAncestralSampler": ("EulerAncestralSampler", "LegacyDDPMDiscretization"),
    "DPMPP2MSampler": ("DPMPP2MSampler", "LegacyDDPMDiscretization"),
    "DPMPP2MSamplerKarras": ("DPMPP2MSampler", "KarrasDiscretization"),
}
DIFFUSIONMODULES = "gm.modules.diffusionmodules"


def build_sampler(name: str, num_steps: int, guidance_scale: float):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    sampler, discretization = SAMPLERS[name]
    guider = (
        {"target": f"{DIFFUSIONMODULES}.guiders.VanillaCFG", "params": {"scale": guidance_scale}}
        if guidance_scale > 1.0 else {"target": f"{DIFFUSIONMODULES}.guiders.IdentityGuider"}
    )
    return instantiate_from_config({
        "target": f"{DIFFUSIONMODULES}.sampler.{sampler}",
        "params": {"num_steps": num_steps, "guider_config": guider,
                   "discretization_config": {"target": f"{DIFFUSIONMODULES}.discretizer.{discretization}"}},
    })


class DenoiseCell(nn.Cell):
    """D(x, sigma | cond) as one Cell, so GRAPH_MODE compiles the UNet call once for all steps. `projections`: the
    UNet's context_projections of crossattn (mindbooth/context_projections.py), the same for all steps."""

    def __init__(self, engine):
        super().__init__(auto_prefix=False)
        self.engine = engine

    def construct(self, x, sigma, crossattn, vector, projections):
        return self.engine.denoise(x, sigma, {"crossattn": crossattn, "vector": vector, "cached_kv": projections})


class EmbedCell(nn.Cell):
    """The conditioner's embedders run inside a Cell of this pipeline. MindSpore keeps a Cell's compiled graph for
    as long as the Cell lives, so text-encoder LoRA injected after an earlier pipeline ran the embedders would be
    silently ignored if they were called directly; a new pipeline compiles them anew."""

    def __init__(self, conditioner, zero_flags: tuple):
        super().__init__(auto_prefix=False)
        self.conditioner = conditioner
        self.zero_flags = zero_flags

    def construct(self, *inputs):
        return self.conditioner.embed(inputs, self.zero_flags)


def size_batch(count: int, width: int, height: int, orig_width=None, orig_height=None, crop_top=0, crop_left=0,
               target_width=None, target_height=None) -> dict:
    """SDXL's size conditioning; defaults: original = target = output size, crop (0, 0). Pairs are (h, w)."""
    original = (orig_height or height, orig_width or width)
    target = (target_height or height, target_width or width)
    return {
        "original_size_as_tuple": np.tile(np.array(original, np.float32), (count, 1)),
        "crop_coords_top_left": np.tile(np.array((crop_top, crop_left), np.float32), (count, 1)),
        "target_size_as_tuple": np.tile(np.array(target, np.float32), (count, 1)),
    }


def text2image_for(config, engine, text_embeddings: dict = None):
    """The text-to-image of an engine built from `config`: DeepFloyd IF's DDPM stage (pixel space; with
    `text_embeddings` when its T5 was used and freed before the engine was built), or the latent diffusion pipeline."""
    return StageText2Image(engine, text_embeddings) if is_if_config(config) else Text2Image(engine)


class Text2Image:
    def __init__(self, engine):
        self.engine = engine
        self.denoise_cell = DenoiseCell(engine)
        conditioner = engine.conditioner
        if conditioner is not None:  # plain, and with zeroed text embeddings (SDXL's empty negative prompt)
            self.embed_cells = {zero_text: EmbedCell(conditioner, conditioner.zero_flags(["txt"] if zero_text else ()))
                                for zero_text in (False, True)}
        # diffusers' force_zeros_for_empty_prompt: only the size-conditioned models (SDXL, SSD-1B: a UNet that takes the
        # vector `y`) were trained with zeroed text for "no prompt"; SD 1.x/2.x encode "" through the text encoder.
        self.zero_empty_negative = bool(engine.model.diffusion_model.has_label_emb)
        self.engine.set_train(False)
        self.cached = {}

    def encode(self, batch: dict, zero_text: bool = False) -> dict:
        vector, crossattn = self.embed_cells[zero_text](*self.engine.conditioner.tokenize(batch))
        return {"crossattn": crossattn, "vector": vector}

    def cache_prompts(self, prompts, width, height, guidance_scale):
        """Encode now what `__call__` will need later, so the text encoders can be freed."""
        negatives = [""] * len(prompts)
        key = (tuple(prompts), tuple(negatives), width, height, guidance_scale > 1.0)
        self.cached[key] = self.conditioning(prompts, negatives, guidance_scale, size_batch(len(prompts), width, height))

    def conditioning(self, prompts, negative_prompts, guidance_scale, sizes):
        cond = self.encode({"txt": list(prompts), **sizes})
        if guidance_scale <= 1.0:
            return cond, None
        # SDXL/SSD-1B: an empty negative prompt means zeroed text embeddings, not the embedding of "" (SD 1.x/2.x).
        zero_text = self.zero_empty_negative and all(not p for p in negative_prompts)
        uc = self.encode({"txt": list(negative_prompts), **sizes}, zero_text=zero_text)
        return cond, uc

    def __call__(self, prompts, negative_prompts=None, width=1024, height=1024, num_steps=40, guidance_scale=5.0,
                 sampler="EulerEDMSampler", seed=42, init_noise=None, init_images=None, strength=1.0, size_options=None,
                 callback=None):
        """Returns (N, H, W, 3) uint8 images. `init_noise`: standard-normal (N, 4, H/f, W/f) used instead of
        the seeded draw; `init_images`: (N, 3, H, W) in [-1, 1] for img2img at `strength`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative_prompts = [""] * len(prompts) if negative_prompts is None else (
            [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts))
        factor = self.engine.latents_per_pixel
        if width % factor or height % factor:
            raise ValueError(f"width and height must be multiples of {factor}, got {width}x{height}")
        rng = np.random.default_rng(seed)
        shape = (len(prompts), 4, height // factor, width // factor)
        # Drawn even when `init_noise` is given, so the later draws (VAE posterior, stochastic samplers)
        # are the same: the seed's own noise passed as `init_noise` gives the seeded image exactly.
        seeded_noise = rng.standard_normal(shape).astype(np.float32)
        if init_noise is None:
            init_noise = seeded_noise
        elif tuple(init_noise.shape) != shape:
            raise ValueError(f"initial latent has shape {tuple(init_noise.shape)}, expected {shape} for {width}x{height}")
        sizes = size_batch(len(prompts), width, height, **(size_options or {}))
        key = (tuple(prompts), tuple(negative_prompts), width, height, guidance_scale > 1.0)
        if key in self.cached and not size_options:
            cond, uc = self.cached[key]
        elif self.engine.conditioner is None:
            raise ValueError("the text encoders were freed (cache_latents): only the cached validation prompts can be sampled")
        else:
            cond, uc = self.conditioning(prompts, negative_prompts, guidance_scale, sizes)
        init_latents = None
        if init_images is not None:
            if tuple(init_images.shape) != (len(prompts), 3, height, width):
                raise ValueError(f"init images have shape {tuple(init_images.shape)}, expected {(len(prompts), 3, height, width)}")
            # The VAE posterior sample is drawn from the seed too, so img2img is reproducible.
            posterior_noise = ms.Tensor(rng.standard_normal(shape).astype(np.float32))
            init_latents = self.engine.encode_first_stage(ms.Tensor(init_images, ms.float32), posterior_noise)
        sampler_obj = build_sampler(sampler, num_steps, guidance_scale)

        context_projections = ContextProjections(self.engine.model.diffusion_model)  # computed at the first step

        def denoiser_fn(x, sigma, c):
            return self.denoise_cell(x, sigma, c["crossattn"], c["vector"], context_projections(c["crossattn"]))

        latents = sampler_obj(denoiser_fn, ms.Tensor(init_noise), cond, uc, callback=callback,
                              init_latents=init_latents, strength=strength, rng=rng)
        images = self.engine.decode_first_stage(latents).asnumpy()
        if not np.isfinite(images).all():
            raise FloatingPointError("sampling produced NaN/Inf; check the weights and the dtype")
        return to_uint8(images)

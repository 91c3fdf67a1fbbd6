"""DiffusionEngine: the whole SDXL model built from one config (sgm's `DiffusionEngine`).

Parameter names follow the official checkpoint: `model.diffusion_model.*` (UNet),
`conditioner.embedders.N.*` (text encoders), `first_stage_model.*` (VAE)."""
from mindspore import nn

from gm.modules.diffusionmodules.wrappers import OpenAIWrapper
from gm.modules.frozen_weights import store_frozen_weights
from gm.modules.lora import freeze_all_but_lora, inject_lora
from gm.util import instantiate_from_config


class DiffusionEngine(nn.Cell):
    def __init__(
        self,
        network_config,
        denoiser_config,
        first_stage_config,
        conditioner_config,
        sampler_config=None,
        loss_fn_config=None,
        scale_factor: float = 1.0,
        latents_per_pixel: int = 8,
        lora_config=None,
        frozen_weight_dtype=None,
        **unused_sgm_options,
    ):
        super().__init__()
        self.model = OpenAIWrapper(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.sampler_config = sampler_config
        self.loss_fn = instantiate_from_config(loss_fn_config) if loss_fn_config is not None else None
        self.scale_factor = scale_factor
        self.latents_per_pixel = latents_per_pixel
        for param in self.get_parameters():  # the base model is frozen; LoRA (if any) is what trains
            param.requires_grad = False
        self.lora_config = dict(lora_config) if lora_config else None
        if self.lora_config:
            inject_lora(self.model, **self.lora_config)
            for name, param in self.parameters_and_names():
                param.name = name
            freeze_all_but_lora(self)
        # float16/bfloat16: the frozen UNet and VAE weights are stored at half size and cast to fp32 at use
        # (the text encoders keep theirs: they use raw Parameters that the cast-at-use layers do not cover).
        self.frozen_weight_dtype = frozen_weight_dtype
        if frozen_weight_dtype:
            store_frozen_weights(self.model, frozen_weight_dtype)
            store_frozen_weights(self.first_stage_model, frozen_weight_dtype)

    def encode_first_stage(self, images, noise=None):
        """Images in [-1, 1] -> scaled latents (what the UNet sees)."""
        return self.first_stage_model.encode(images, noise) * self.scale_factor

    def decode_first_stage(self, latents):
        return self.first_stage_model.decode(latents / self.scale_factor)

    def free_encoders(self):
        """Drop the VAE encoder and the text encoders (after latents and embeddings were cached)."""
        for name in ("encoder", "quant_conv"):
            if hasattr(self.first_stage_model, name):
                delattr(self.first_stage_model, name)
        del self.conditioner
        self.conditioner = None

    def denoise(self, x, sigma, cond):
        return self.denoiser(self.model, x, sigma, cond)

"""DiffusionEngine: the whole SDXL model built from one config (sgm's `DiffusionEngine`).

Parameter names follow the official checkpoint: `model.diffusion_model.*` (UNet),
`conditioner.embedders.N.*` (text encoders), `first_stage_model.*` (VAE).

DeepFloyd IF is the same engine in pixel space: `network_wrapper` IFWrapper, an IdentityFirstStage, a T5 conditioner
(stage I) or none (stage II, `conditioner_config: __is_unconditional__`: it takes stage I's embeddings)."""
import mindspore as ms
from mindspore import nn

from gm.backends import apply_backend
from gm.modules.diffusionmodules.wrappers import OpenAIWrapper
from gm.modules.frozen_weights import store_frozen_weights
from gm.modules.lora import freeze_all_but_lora, inject_lora, is_lora_name
from gm.util import get_obj_from_str, instantiate_from_config


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
        backend: str = "auto",
        network_wrapper: str = None,
        lora_targets=None,
        **unused_sgm_options,
    ):
        """`backend`: how the built model computes (gm.backends): `plain` MindSpore, `cpu` (MindBooth's CPU kernels),
        or `auto` (cpu where MindSpore runs on the CPU and the kernels build). `network_wrapper`: the class (a dotted
        path, sgm's option) that adapts the network to the conditioning dict; OpenAIWrapper by default.
        `lora_targets`: the `attentions` and `target_modules` a LoRA loaded later goes on (add_unet_lora), where they
        are not SD's attn1/attn2 q/k/v/out (DeepFloyd IF's added-key/value attentions)."""
        super().__init__()
        # a frozen base in a low-precision dtype: stored so block by block as the UNet is built (its fp32 peak)
        weight_dtype = {"weight_dtype": frozen_weight_dtype} if frozen_weight_dtype else {}
        wrapper = OpenAIWrapper if network_wrapper is None else get_obj_from_str(network_wrapper)
        self.model = wrapper(instantiate_from_config(network_config, **weight_dtype))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.sampler_config = sampler_config
        self.loss_fn = instantiate_from_config(loss_fn_config) if loss_fn_config is not None else None
        self.scale_factor = scale_factor
        self.latents_per_pixel = latents_per_pixel
        self.lora_targets = dict(lora_targets) if lora_targets else {}
        for param in self.get_parameters():  # the base model is frozen; LoRA (if any) is what trains
            param.requires_grad = False
        self.lora_config = dict(lora_config) if lora_config else None
        if self.lora_config:
            unet_lora = dict(self.lora_config)
            text_encoder = bool(unet_lora.pop("text_encoder", False))
            self.add_unet_lora(**unet_lora)
            if text_encoder:
                self.add_text_encoder_lora(unet_lora.get("rank", 4), unet_lora.get("alpha"), unet_lora.get("dropout", 0.0))
        # float16/bfloat16: the frozen UNet and VAE weights are stored at half size and cast to fp32 at use
        # (the text encoders keep theirs: they use raw Parameters that the cast-at-use layers do not cover).
        self.frozen_weight_dtype = frozen_weight_dtype
        if frozen_weight_dtype:
            store_frozen_weights(self.model, frozen_weight_dtype)
            store_frozen_weights(self.first_stage_model, frozen_weight_dtype)
        self.backend = apply_backend(self, backend)

    def add_unet_lora(self, rank: int = 4, alpha: float = None, dropout: float = 0.0, **targets) -> int:
        """LoRA on the UNet's attention projections (`lora_config`: rank, alpha, dropout, target_modules, attentions)."""
        added = inject_lora(self.model, rank, alpha, dropout, **{**self.lora_targets, **targets})
        self._name_and_freeze()
        self._reapply_backend()
        return added

    def add_text_encoder_lora(self, rank: int = 4, alpha: float = None, dropout: float = 0.0) -> int:
        """LoRA on the text encoders' self-attention q/k/v/out (`lora_config.text_encoder: True`)."""
        if self.conditioner is None:
            raise RuntimeError("the text encoders were freed (free_encoders); text-encoder LoRA needs them")
        added = self.conditioner.add_text_encoder_lora(rank, rank if alpha is None else alpha, dropout)
        self._name_and_freeze()
        self._reapply_backend()
        return added

    def make_trainable(self, prefixes) -> int:
        """Full fine-tuning: every parameter whose name starts with one of `prefixes` (e.g. "model.diffusion_model.",
        "conditioner.") trains. Layers the CPU backend gave a frozen-weight form at construction (whose backward
        leaves the weight gradient at zero) are switched back to their trainable form. Weights stored in a low
        precision (frozen_weight_dtype) are refused: trained weights must be fp32. Returns the parameters made
        trainable."""
        prefixes = tuple(prefixes)
        chosen = [(name, param) for name, param in self.parameters_and_names() if name.startswith(prefixes)]
        low_precision = [(name, param.dtype) for name, param in chosen if param.dtype != ms.float32]
        if low_precision:
            name, dtype = low_precision[0]
            raise ValueError(f"{name} is stored as {dtype}: trained weights must be fp32 (drop frozen_weight_dtype)")
        for _, param in chosen:
            param.requires_grad = True
        for _, cell in self.cells_and_names():
            weight = getattr(cell, "weight", None)
            if hasattr(cell, "thaw_weight") and isinstance(weight, ms.Parameter) and weight.requires_grad:
                cell.thaw_weight()
        return len(chosen)

    def _reapply_backend(self):
        """New layers (LoRA) compute as the rest of the model: the backend's variants of them too."""
        if getattr(self, "backend", None) is not None:
            apply_backend(self, self.backend)

    @property
    def has_text_encoder_lora(self) -> bool:
        return any(is_lora_name(name) for name, _ in self.parameters_and_names() if name.startswith("conditioner."))

    @property
    def trains_text_encoders(self) -> bool:
        """Whether any text-encoder weight trains: their LoRA, or all of them after make_trainable(["conditioner."])."""
        return self.conditioner is not None and any(p.requires_grad for p in self.conditioner.get_parameters())

    def _name_and_freeze(self):
        for name, param in self.parameters_and_names():
            param.name = name
        freeze_all_but_lora(self)

    def encode_first_stage(self, images, noise=None):
        """Images in [-1, 1] -> scaled latents (what the UNet sees)."""
        return self.first_stage_model.encode(images, noise) * self.scale_factor

    def decode_first_stage(self, latents):
        return self.first_stage_model.decode(latents / self.scale_factor)

    def free_encoders(self, text_encoders: bool = True):
        """Drop the VAE encoder (after latents were cached) and, unless told not to, the text encoders (after
        the text embeddings were cached)."""
        for name in ("encoder", "quant_conv"):
            if hasattr(self.first_stage_model, name):
                delattr(self.first_stage_model, name)
        if text_encoders:
            del self.conditioner
            self.conditioner = None

    def denoise(self, x, sigma, cond):
        return self.denoiser(self.model, x, sigma, cond)

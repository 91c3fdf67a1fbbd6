"""A model loaded once for sampling: the base weights stay in memory; LoRA files and their scale can
change between generations without reloading the base (what the Streamlit demo needs, and the CLI reuses).

The LoRA scale is applied to the LoRA B weights (B <- lora_scale * B_file), not to `LoRADense.scale`:
a Python attribute is a constant of a compiled GRAPH_MODE graph, so changing it after the first
generation would be silently ignored, while parameter data is read at every call. Where a LoRA file does
change `LoRADense.scale` (its alpha/rank) or the layers themselves, the denoising graph is rebuilt.
"""
import threading
from pathlib import Path

import mindspore as ms
import numpy as np

from gm.modules.lora import is_lora_name, lora_layers, lora_parameters
from gm.util import instantiate_from_config
from mindbooth import checkpoint
from mindbooth.config import load_config
from mindbooth.file_identity import file_identity
from mindbooth.if_cascade import is_if_config
from mindbooth.pipeline import Text2Image


def split_weights(weights) -> list:
    """'base.ckpt,lora.ckpt' or a list -> [paths], blanks dropped."""
    if isinstance(weights, str):
        weights = weights.split(",")
    return [str(w).strip() for w in weights if str(w).strip()]


def size_multiple(config) -> int:
    """Width and height must be multiples of this: the VAE factor times the UNet's downsampling
    (32 for SDXL: other sizes break the UNet's skip connections)."""
    params = config.model.params
    network = params.network_config.params  # channel_mult (sgm UNets) or block_out_channels (DeepFloyd IF's)
    channel_mult = network.get("channel_mult") or network.get("block_out_channels") or [1]
    return int(params.get("latents_per_pixel", 8)) * 2 ** (len(channel_mult) - 1)


# The conditioner inputs of SDXL-style size conditioning (SDXL, SSD-1B); SD 1.x/2.x have none of them.
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
DEFAULT_NATIVE_RESOLUTION = 1024  # SDXL's, for a config that names none (the SDXL training YAMLs)


def native_resolution(config) -> int:
    """The side (pixels) the model was trained at, the default output size: the inference YAML's
    `native_resolution` (a training YAML inherits it through `base`), else a training YAML's data.resolution, else 1024."""
    value = config.get("native_resolution") or (config.get("data") or {}).get("resolution") or DEFAULT_NATIVE_RESOLUTION
    return int(value)


def size_conditioned(config) -> bool:
    """Whether the model takes SDXL's size conditioning (original size, crop, target size) as conditioner inputs."""
    conditioner = config.model.params.get("conditioner_config")
    if not hasattr(conditioner, "get"):  # none, or sgm's "__is_unconditional__" (DeepFloyd IF's stage II)
        return False
    embedders = conditioner.get("params", {}).get("emb_models", [])
    return any(embedder.get("input_key") in SIZE_KEYS for embedder in embedders)


def model_name(config) -> str:
    """The config's `version` (e.g. SD-1.5), for messages."""
    return str(config.get("version", "this model"))


class LoRARankChanged(ValueError):
    """A LoRA file whose rank differs from the LoRA layers already in the model: the model must be rebuilt."""


class SamplingModel:
    def __init__(self, config_path, base_weight):
        config_path = Path(config_path)
        if not config_path.is_file():
            raise FileNotFoundError(f"model config not found: {config_path}")
        self.config = load_config(config_path)
        if "model" not in self.config:
            raise ValueError(f"{config_path} has no 'model' section; use configs/inference/*.yaml or a training config")
        if is_if_config(self.config):  # before building: stage I alone is 9B parameters with its T5
            raise ValueError(f"{config_path} is DeepFloyd IF, which samples from the command line only "
                             "(demo/sampling_without_streamlit.py), not through this model loader")
        self.engine = instantiate_from_config(self.config.model)
        checkpoint.load_weights(self.engine, [base_weight])
        self.key = (str(config_path.resolve()), file_identity(base_weight))
        # LoRA as the base file and config left it (usually none, or zero B from a training config's lora_config)
        self._base_lora = {name: param.asnumpy() for name, param in lora_parameters(self.engine).items()}
        self._base_scales = {id(layer): layer.scale for layer in lora_layers(self.engine)}
        self._lora_key = ()
        self._lora_b = {name: value for name, value in self._base_lora.items() if ".lora_B." in name}
        self._lora_scale = 1.0
        self._text2image, self._graph_signature = None, None
        self.lock = threading.RLock()  # one LoRA choice + generation at a time (Streamlit serves several sessions)

    @property
    def latents_per_pixel(self) -> int:
        return int(self.engine.latents_per_pixel)

    @property
    def size_multiple(self) -> int:
        return size_multiple(self.config)

    @property
    def native_resolution(self) -> int:
        return native_resolution(self.config)

    @property
    def size_conditioned(self) -> bool:
        return size_conditioned(self.config)

    @property
    def lora_rank(self):
        ranks = {layer.rank for layer in lora_layers(self.engine)}
        return ranks.pop() if len(ranks) == 1 else None

    def set_lora(self, paths, scale: float = 1.0):
        """Use these LoRA files (in order; later files override the same layers) at `scale`; [] = the base."""
        with self.lock:
            self._set_lora(split_weights(paths), float(scale))

    def _set_lora(self, paths, scale):
        key = tuple(file_identity(p) for p in paths)
        if key != self._lora_key:
            self._lora_key = None  # if a file fails half-way, the next call starts again from the base
            self._restore_base_lora()
            for path in paths:
                self._load_lora_file(path)
            self._lora_b = {name: param.asnumpy() for name, param in lora_parameters(self.engine).items() if ".lora_B." in name}
            self._lora_key = key
            self._lora_scale = None
        if scale != self._lora_scale:
            own = lora_parameters(self.engine)
            for name, value in self._lora_b.items():
                own[name].set_data(ms.Tensor(value * np.float32(scale)).astype(own[name].dtype))
            self._lora_scale = scale

    def _restore_base_lora(self):
        for name, param in lora_parameters(self.engine).items():
            if name in self._base_lora:
                param.set_data(ms.Tensor(self._base_lora[name]).astype(param.dtype))
            elif ".lora_B." in name:  # layers injected after the base was loaded: no contribution
                param.set_data(ms.ops.zeros(param.shape, param.dtype))
        for layer in lora_layers(self.engine):
            layer.scale = self._base_scales.get(id(layer), layer.scale)

    def _load_lora_file(self, path):
        params = checkpoint.read_checkpoint(path)
        lora = {k: v for k, v in params.items() if is_lora_name(k)}
        if not lora:
            raise ValueError(f"{path} holds no LoRA weights (names with .lora_A./.lora_B.); is it a base model?")
        rank, _ = checkpoint.lora_rank_alpha({**lora, **{k: params[k] for k in checkpoint.LORA_METADATA if k in params}})
        if self.lora_rank is not None and rank != self.lora_rank:
            raise LoRARankChanged(f"{path} has LoRA rank {rank} but the model's LoRA layers have rank {self.lora_rank} "
                                  "(a training config fixes it in model.params.lora_config; use configs/inference/*.yaml)")
        checkpoint.load_lora(self.engine, lora, params, path, lora_dropout=0.0)

    def text2image(self) -> Text2Image:
        """The pipeline, rebuilt when the LoRA layers or their (compile-time) scales changed."""
        signature = tuple((id(layer), layer.scale, layer.merged) for layer in lora_layers(self.engine))
        if self._text2image is None or signature != self._graph_signature:
            self._text2image, self._graph_signature = Text2Image(self.engine), signature
        return self._text2image

    def generate(self, **kwargs) -> np.ndarray:
        """Text2Image's keyword arguments -> (N, H, W, 3) uint8."""
        with self.lock:
            return self.text2image()(**kwargs)


def load_sampling_model(config_path, weights, lora_scale: float = 1.0, reuse: SamplingModel = None) -> SamplingModel:
    """`weights` = [base, lora...]. Reuses `reuse` when it holds the same config and base file (only the
    LoRA is swapped); builds a new model otherwise, or when a LoRA of another rank needs new layers."""
    weights = split_weights(weights)
    if not weights:
        raise ValueError("no weights given: pass --weight path/to/base.ckpt[,path/to/lora.ckpt]")
    for path in weights:
        file_identity(path)  # a missing file is reported before anything is loaded
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"model config not found: {config_path}")
    key = (str(Path(config_path).resolve()), file_identity(weights[0]))
    model = reuse if reuse is not None and reuse.key == key else SamplingModel(config_path, weights[0])
    try:
        model.set_lora(weights[1:], lora_scale)
    except LoRARankChanged:
        if model is not reuse:
            raise
        model = SamplingModel(config_path, weights[0])
        model.set_lora(weights[1:], lora_scale)
    return model

"""The DreamBooth evaluation's feature extractors, loaded from a user's downloaded Hugging Face folders:
DINO (a `ViTModel` folder such as facebook/dino-vits16) and CLIP (a `CLIPModel` folder such as
openai/clip-vit-large-patch14). Each folder needs config.json, model.safetensors and preprocessor_config.json.

Weights are read by name (transformers' file names; MindSpore calls a norm's weight/bias gamma/beta and an
embedding table `embedding_table`), every parameter must be found and no unknown tensor may be left over.
"""
import json
import re
from pathlib import Path

import mindspore as ms
import numpy as np

from gm.modules.embedders.clip_model import CLIPModel, first_token_positions
from gm.modules.embedders.tokenizer import CLIPTokenizer
from gm.modules.embedders.vit import ViTModel
from gm.util import load_params
from mindbooth.image_preprocessing import CLIP_DEFAULTS, VIT_DEFAULTS, ImagePreprocessing
from mindbooth.tensor_dtypes import FLOATS, ConversionError, cast
from mindbooth.validation import UsageError
from tools.model_conversion.keymap import mindspore_to_official_name
from tools.model_conversion.safetensors_stream import SafetensorsReader

BATCH_SIZE = 8
CLIP_LAYER_NORM_EPS = 1e-5  # what gm's CLIP blocks are built with
# Tensors of the files that the extractors do not use: pooler head, CLIP's temperature, transformers' id buffers.
UNUSED = re.compile(r"^(pooler\.|logit_scale$|embeddings\.mask_token$)|position_ids$")
# transformers >= 5 names ViT's layers differently in memory; a file saved with save_original_format=False has
# these names. Mapped back to the original ones (those of the files on the Hub).
VIT_V5_NAMES = [
    (re.compile(r"^layers\.(\d+)\.attention\.([qkv])_proj\."), None),
    (re.compile(r"^layers\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
]
_QKV = {"q": "query", "k": "key", "v": "value"}


def _vit_original_name(name: str) -> str:
    for pattern, target in VIT_V5_NAMES:
        match = pattern.match(name)
        if match:
            if target is None:
                return f"encoder.layer.{match[1]}.attention.attention.{_QKV[match[2]]}." + name[match.end():]
            return pattern.sub(target, name, count=1)
    return name


class HFFolder:
    """config.json, preprocessor_config.json and model.safetensors of a downloaded model, checked."""

    def __init__(self, folder, flag: str, model_type: str, example: str):
        self.path, self.flag = Path(folder), flag
        where = f"{flag} {folder}"
        expected = f"(the folder of a downloaded {example}: config.json, model.safetensors, preprocessor_config.json)"
        if not self.path.is_dir():
            raise UsageError(f"{where}: no such folder {expected}")
        self.config = self._json("config.json", expected)
        if self.config.get("model_type") != model_type:
            raise UsageError(f"{where}: config.json is a '{self.config.get('model_type')}' model, {flag} needs a "
                             f"'{model_type}' one {expected}")
        self.preprocessor = self._json("preprocessor_config.json", expected)
        self.weights = self.path / "model.safetensors"
        if not self.weights.is_file():
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            if bins:
                raise UsageError(
                    f"{where}: no model.safetensors, only {bins[0]}; .bin files are not read (they are pickles): "
                    f"convert once with python -c \"from transformers import AutoModel; "
                    f"AutoModel.from_pretrained('{self.path}').save_pretrained('{self.path}')\"")
            raise UsageError(f"{where}: no model.safetensors {expected}")

    def _json(self, name: str, expected: str) -> dict:
        path = self.path / name
        if not path.is_file():
            raise UsageError(f"{self.flag} {self.path}: no {name} {expected}")
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise UsageError(f"{self.flag} {path}: not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise UsageError(f"{self.flag} {path}: not a JSON object")
        return value

    def tensors(self, rename=lambda name: name) -> dict:
        """{file name: float32 array} of every used tensor."""
        out = {}
        try:
            with SafetensorsReader(self.weights) as reader:
                for info in reader.in_file_order():
                    name = rename(info.name)
                    if UNUSED.search(name):
                        continue
                    data = reader.read(info.name)
                    out[name] = cast(data, info.dtype, "F32") if info.dtype in FLOATS else data
        except ConversionError as error:
            raise UsageError(f"{self.flag}: {error}") from None
        return out

    def load_into(self, net, tensors: dict):
        """Copy `tensors` (file names) into `net` by name; a missing or left-over tensor is an error."""
        own = {mindspore_to_official_name(name): name for name, _ in net.parameters_and_names()}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise UsageError(f"{self.flag} {self.weights} does not match its config.json: {len(missing)} tensors "
                             f"missing (first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
        try:
            load_params(net, {own[name]: value for name, value in tensors.items()}, what=f"{self.flag} {self.weights}")
        except ValueError as error:  # a shape that disagrees with config.json
            raise UsageError(str(error)) from None
        net.set_train(False)


def _option(config: dict, key: str, default, where: str):
    value = config.get(key, default)
    if isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UsageError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _built(build, where: str):
    try:
        return build()
    except ValueError as error:  # sizes or activation the model cannot be built with
        raise UsageError(f"{where}: {error}") from None


def _batched(fn, items, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)])


class DinoExtractor:
    """DINO image embeddings: the [CLS] token of the ViT's final-normed last hidden state."""

    def __init__(self, folder, flag: str = "--dino"):
        hf = HFFolder(folder, flag, "vit", "facebook/dino-vits16")
        c, where = hf.config, f"{flag} {hf.path / 'config.json'}"
        sizes = dict(width=_option(c, "hidden_size", 768, where), layers=_option(c, "num_hidden_layers", 12, where),
                     heads=_option(c, "num_attention_heads", 12, where),
                     mlp_width=_option(c, "intermediate_size", 3072, where),
                     image_size=_option(c, "image_size", 224, where), patch_size=_option(c, "patch_size", 16, where),
                     channels=_option(c, "num_channels", 3, where))
        self.model = _built(lambda: ViTModel(**sizes, act=c.get("hidden_act", "gelu"),
                                             layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
                                             qkv_bias=bool(c.get("qkv_bias", True))), where)
        hf.load_into(self.model, hf.tensors(_vit_original_name))
        self.preprocess = ImagePreprocessing.from_config(hf.preprocessor, VIT_DEFAULTS,
                                                         f"{flag} {hf.path / 'preprocessor_config.json'}")
        self.image_size = sizes["image_size"]

    def image_features(self, images, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """RGB PIL images -> (N, width) float32."""
        def run(chunk):
            pixels = _check_size(self.preprocess.batch(chunk), self.image_size)
            return self.model(ms.Tensor(pixels)).asnumpy()[:, 0]
        return _batched(run, list(images), batch_size)


class ClipExtractor:
    """CLIP image and text embeddings in the joint space (transformers' get_image_features / get_text_features)."""

    def __init__(self, folder, flag: str = "--clip"):
        hf = HFFolder(folder, flag, "clip", "openai/clip-vit-large-patch14")
        where = f"{flag} {hf.path / 'config.json'}"
        text, vision = hf.config.get("text_config") or {}, hf.config.get("vision_config") or {}
        for part, c in (("text_config", text), ("vision_config", vision)):
            if not isinstance(c, dict):
                raise UsageError(f"{where}: {part} is not a mapping")
            eps = float(c.get("layer_norm_eps", CLIP_LAYER_NORM_EPS))
            if eps != CLIP_LAYER_NORM_EPS:
                raise UsageError(f"{where}: {part}.layer_norm_eps {eps} is not CLIP's {CLIP_LAYER_NORM_EPS}")
        self.tokenizer = CLIPTokenizer(max_length=_option(text, "max_position_embeddings", 77, where))
        text_sizes = dict(width=_option(text, "hidden_size", 512, where),
                          layers=_option(text, "num_hidden_layers", 12, where),
                          heads=_option(text, "num_attention_heads", 8, where),
                          mlp_width=_option(text, "intermediate_size", 2048, where),
                          act=text.get("hidden_act", "quick_gelu"), vocab_size=_option(text, "vocab_size", 49408, where),
                          max_length=self.tokenizer.max_length)
        if text_sizes["vocab_size"] != self.tokenizer.vocab_size:
            raise UsageError(f"{where}: text vocab_size {text_sizes['vocab_size']} is not the CLIP tokenizer's "
                             f"{self.tokenizer.vocab_size}")
        vision_sizes = dict(width=_option(vision, "hidden_size", 768, where),
                            layers=_option(vision, "num_hidden_layers", 12, where),
                            heads=_option(vision, "num_attention_heads", 12, where),
                            mlp_width=_option(vision, "intermediate_size", 3072, where),
                            act=vision.get("hidden_act", "quick_gelu"),
                            image_size=_option(vision, "image_size", 224, where),
                            patch_size=_option(vision, "patch_size", 32, where),
                            channels=_option(vision, "num_channels", 3, where))
        projection_dim = _option(hf.config, "projection_dim", 512, where)
        self.model = _built(lambda: CLIPModel(text_sizes, vision_sizes, projection_dim), where)
        hf.load_into(self.model, hf.tensors())
        self.preprocess = ImagePreprocessing.from_config(hf.preprocessor, CLIP_DEFAULTS,
                                                         f"{flag} {hf.path / 'preprocessor_config.json'}")
        self.image_size = vision_sizes["image_size"]

    def image_features(self, images, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """RGB PIL images -> (N, projection_dim) float32."""
        def run(chunk):
            pixels = _check_size(self.preprocess.batch(chunk), self.image_size)
            return self.model.image_embeds(ms.Tensor(pixels)).asnumpy()
        return _batched(run, list(images), batch_size)

    def text_features(self, prompts, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Prompts -> (N, projection_dim) float32 (the tokenizer truncates past max_position_embeddings)."""
        def run(chunk):
            ids = self.tokenizer(list(chunk))
            positions = first_token_positions(ids, self.tokenizer.eos_id)
            return self.model.text_embeds(ms.Tensor(ids), ms.Tensor(positions)).asnumpy()
        return _batched(run, list(prompts), batch_size)


def _check_size(pixels: np.ndarray, image_size: int) -> np.ndarray:
    if pixels.shape[-2:] != (image_size, image_size):
        raise UsageError(f"preprocessor_config.json makes {pixels.shape[-2]}x{pixels.shape[-1]} inputs, the model "
                         f"takes {image_size}x{image_size}: the folder's two configs disagree")
    return pixels

"""Images -> model input the way transformers' image processors do it (their PIL backend), from the
`preprocessor_config.json` that comes with a downloaded model: resize (PIL, on 8-bit RGB), center crop,
rescale to [0, 1], normalise with the model's mean and std.

Keys a file leaves out take the value of the processor class it was written for (`ViTImageProcessor` for DINO,
`CLIPImageProcessor` for CLIP), the defaults below.
"""
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mindbooth.validation import UsageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' class defaults; `default_to_square` says how a bare int `size` is read (square, or shortest edge)
VIT_DEFAULTS = dict(do_resize=True, size={"height": 224, "width": 224}, resample=2, do_center_crop=False,
                    crop_size=None, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), default_to_square=True)
CLIP_DEFAULTS = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                     crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, default_to_square=False)
RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def _size(value, default_to_square: bool, what: str):
    """transformers' `get_size_dict`, reduced to what image models use: ("shortest_edge", n) or ("square", (h, w))."""
    if isinstance(value, int):
        return ("square", (value, value)) if default_to_square else ("shortest_edge", value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return "square", (int(value[0]), int(value[1]))
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return "shortest_edge", int(value["shortest_edge"])
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return "square", (int(value["height"]), int(value["width"]))
    raise UsageError(f"{what} {value!r} is not supported (expected an int, {{'shortest_edge'}} or {{'height', 'width'}})")


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C) around the center, zero-padded where the image is smaller (transformers'
    `center_crop`: top = (H - height) // 2)."""
    h, w = array.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return array[top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((new_h, new_w) + array.shape[2:], array.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = array
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


@dataclass(frozen=True)
class ImagePreprocessing:
    resize: tuple        # None, ("shortest_edge", n) or ("square", (height, width))
    resample: int        # PIL filter
    crop: tuple          # None or (height, width)
    rescale: float       # None or the factor (1/255)
    mean: tuple          # None (no normalisation) or per-channel
    std: tuple

    @classmethod
    def from_config(cls, config: dict, defaults: dict, source: str = "preprocessor_config.json"):
        """From a preprocessor_config.json's mapping; `defaults`: VIT_DEFAULTS or CLIP_DEFAULTS."""
        get = lambda key: config.get(key, defaults[key])  # noqa: E731
        resize = _size(get("size"), defaults["default_to_square"], f"{source}: size") if get("do_resize") else None
        crop = None
        if get("do_center_crop"):
            kind, crop = _size(get("crop_size"), True, f"{source}: crop_size")
            if kind != "square":
                raise UsageError(f"{source}: crop_size needs a height and a width, got {get('crop_size')!r}")
        resample = get("resample")
        if resample not in RESAMPLE:
            raise UsageError(f"{source}: resample {resample!r} is not one of PIL's filters {sorted(RESAMPLE)}")
        mean = std = None
        if get("do_normalize"):
            mean, std = tuple(float(v) for v in get("image_mean")), tuple(float(v) for v in get("image_std"))
            if len(mean) != 3 or len(std) != 3:
                raise UsageError(f"{source}: image_mean and image_std need 3 values (RGB), got {mean} and {std}")
        rescale = float(get("rescale_factor")) if get("do_rescale") else None
        return cls(resize, RESAMPLE[resample], crop, rescale, mean, std)

    def _resized(self, height: int, width: int) -> tuple:
        kind, size = self.resize
        if kind == "square":
            return size
        # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        return (new_long, size) if width <= height else (size, new_long)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> (3, H, W) float32."""
        if self.resize is not None:
            height, width = self._resized(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image)
        if self.crop is not None:
            array = center_crop(array, *self.crop)
        if self.rescale is not None:
            array = (array.astype(np.float64) * self.rescale).astype(np.float32)
        else:
            array = array.astype(np.float32)
        if self.mean is not None:
            array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def batch(self, images) -> np.ndarray:
        return np.stack([self(image) for image in images])

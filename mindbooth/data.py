"""The DreamBooth dataset: instance images with the instance prompt, paired with class images and the
class prompt. Each image brings its own SDXL size conditioning (original size, crop corner, target size); the
conditioner of a model without it (SD 1.x/2.x) reads only the prompt."""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mindbooth.buckets import nearest_bucket
from mindbooth.images import list_images, load_rgb


@dataclass
class Example:
    pixels: np.ndarray  # (3, H, W) float32 in [-1, 1]
    original_size: tuple  # (height, width) of the file, after EXIF rotation
    crop_top_left: tuple  # (top, left) in the resized image
    target_size: tuple  # (height, width) of the training crop


def prepare_image(image: Image.Image, size, center_crop: bool, random_flip: bool, rng: np.random.Generator) -> Example:
    """Resize, keeping the aspect, to cover `size` (a side: a square; or (height, width): an aspect-ratio bucket),
    optionally flip, crop `size` (random or centered) from it."""
    target_h, target_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    resized_w, resized_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    image = image.resize((resized_w, resized_h), Image.BICUBIC)
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if center_crop:
        top, left = (resized_h - target_h) // 2, (resized_w - target_w) // 2
    else:
        top, left = int(rng.integers(0, resized_h - target_h + 1)), int(rng.integers(0, resized_w - target_w + 1))
    image = image.crop((left, top, left + target_w, top + target_h))
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return Example(pixels, (height, width), (top, left), (target_h, target_w))


def sidecar_caption(image_path):
    """The stripped text of `<image stem>.txt` next to the image, or None."""
    sidecar = Path(image_path).with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() or None if sidecar.is_file() else None


def instance_prompts(instance_data_path, instance_prompt: str) -> list:
    """The prompt of each instance image (list_images order): its `<image>.txt` sidecar caption (kohya/diffusers
    style), else `instance_prompt`."""
    return [sidecar_caption(path) or instance_prompt for path in list_images(instance_data_path)]


class DreamBoothDataset:
    """Item i pairs instance image i mod n_instance with class image i mod n_class.
    Length = n_instance * train_data_repeat (at least one pass over the class images).
    With `buckets` (aspect-ratio buckets, mindbooth/buckets.py) an item trains at its instance image's nearest
    bucket, and its class image is cropped to that bucket too (a batch must be one shape); else at a square."""

    def __init__(self, instance_data_path, instance_prompt: str, resolution: int, class_data_path=None, class_prompt: str = None,
                 train_data_repeat: int = 1, center_crop: bool = False, random_flip: bool = False, buckets=None):
        self.instance_paths = list_images(instance_data_path)
        if not self.instance_paths:
            raise ValueError(f"no images found in instance_data_path {instance_data_path}; put 3-10 photos of your subject there")
        self.instance_prompts = instance_prompts(instance_data_path, instance_prompt)
        self.with_prior_preservation = class_data_path is not None
        self.class_paths = list_images(class_data_path) if self.with_prior_preservation else []
        if self.with_prior_preservation and not self.class_paths:
            raise ValueError(f"no class images in {class_data_path}: sample them first (num_class_images > 0)")
        self.class_prompt = class_prompt
        self.resolution = resolution
        self.buckets = list(buckets) if buckets else None
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.length = max(len(self.instance_paths) * max(1, train_data_repeat), len(self.class_paths))
        # items i and i + num_distinct pair the same two files (what a latent cache keys on)
        self.num_distinct = math.lcm(len(self.instance_paths), len(self.class_paths) or 1)
        # read every file now, to fail before training naming a bad one; (width, height) of the instance images
        image_sizes = [load_rgb(path).size for path in self.instance_paths + self.class_paths][:len(self.instance_paths)]
        # the (height, width) each instance image trains at: its nearest bucket, or the square
        self.instance_sizes = [nearest_bucket(self.buckets, height, width) if self.buckets else (resolution, resolution)
                               for width, height in image_sizes]

    def item_size(self, index: int) -> tuple:
        """(height, width) of item `index`'s examples: its instance image's bucket (or the square)."""
        return self.instance_sizes[index % len(self.instance_paths)]

    def __len__(self):
        return self.length

    def examples(self, index: int, rng: np.random.Generator):
        """[(Example, prompt)] for item `index`: the instance one, then the class one if any."""
        i = index % len(self.instance_paths)
        pairs = [(self.instance_paths[i], self.instance_prompts[i])]
        if self.with_prior_preservation:
            pairs.append((self.class_paths[index % len(self.class_paths)], self.class_prompt))
        size = self.item_size(index)
        return [(prepare_image(load_rgb(p), size, self.center_crop, self.random_flip, rng), prompt) for p, prompt in pairs]


def collate(items) -> dict:
    """Items from `DreamBoothDataset.examples` -> one batch: all instance examples first, then all class
    examples (the order `DreamBoothLoss` splits on)."""
    ordered = [item[0] for item in items] + [item[1] for item in items if len(item) > 1]
    return {
        "pixels": np.stack([e.pixels for e, _ in ordered]),
        "txt": [prompt for _, prompt in ordered],
        "original_size_as_tuple": np.array([e.original_size for e, _ in ordered], np.float32),
        "crop_coords_top_left": np.array([e.crop_top_left for e, _ in ordered], np.float32),
        "target_size_as_tuple": np.array([e.target_size for e, _ in ordered], np.float32),
    }


class BatchSampler:
    """Shuffled indices, epoch after epoch, from a numpy Generator whose state can be saved and restored.
    With `num_shards` > 1 each rank takes every num_shards-th index of the same global order."""

    def __init__(self, dataset_length: int, batch_size: int, seed: int, shard: int = 0, num_shards: int = 1):
        self.dataset_length = dataset_length
        self.batch_size = batch_size
        self.shard, self.num_shards = shard, num_shards
        self.rng = np.random.default_rng(seed)
        self.order, self.position = [], 0

    def next_indices(self) -> list:
        global_batch = self.batch_size * self.num_shards
        indices = []
        while len(indices) < global_batch:
            if self.position >= len(self.order):
                self.order, self.position = self.rng.permutation(self.dataset_length).tolist(), 0
            indices.append(self.order[self.position])
            self.position += 1
        return indices[self.shard::self.num_shards]

    def sample_generators(self, key: int) -> list:
        """One numpy Generator per sample that `next_indices` returned, keyed by the sample's position in the
        global batch (not by the rank): N ranks x batch B then draw the crops and noise 1 rank x batch N*B draws."""
        return [np.random.default_rng([key, self.shard + j * self.num_shards]) for j in range(self.batch_size)]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": list(self.order), "position": self.position}

    def load_state(self, state: dict):
        self.rng.bit_generator.state = state["rng"]
        self.order, self.position = list(state["order"]), state["position"]

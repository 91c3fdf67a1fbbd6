"""Prior preservation needs `num_class_images` class images: sample the missing ones with the frozen base model."""
import hashlib
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mindbooth.images import list_images, save_image_atomic


def missing_class_image_names(class_dir, num_class_images: int, class_prompt: str) -> list:
    """File names for the class images still to sample. Names carry a hash of the prompt and never collide
    with files already in the folder (the user's own images are never touched)."""
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = list_images(class_dir)
    missing = num_class_images - len(existing)
    if missing <= 0:
        return []
    taken = {p.name for p in class_dir.iterdir()}
    tag = hashlib.sha1(class_prompt.encode()).hexdigest()[:8]
    names, index = [], 0
    while len(names) < missing:
        name = f"class_{tag}_{index:05d}.png"
        if name not in taken:
            names.append(name)
        index += 1
    return names


def sample_class_images(text2image, class_dir, names, class_prompt: str, resolution: int, sampling: dict, seed: int,
                        rank: int = 0, world_size: int = 1, show_progress: bool = True, sizes=None):
    """Sample the images `names` into `class_dir`, square at `resolution` or each at its (height, width) of `sizes`
    (aspect-ratio buckets); rank r takes names r, r + world_size, ... (no two ranks write the same file). Each
    image's seed is derived from its name, so the split does not change the images."""
    sizes = dict(zip(names, sizes)) if sizes is not None else {name: (resolution, resolution) for name in names}
    mine = names[rank::world_size]
    batch_size = int(sampling.get("batch_size", 1))
    progress = tqdm(total=len(mine), desc=f"sampling class images (rank {rank})", disable=not show_progress)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        for name in chunk:  # one call per image: its noise comes from its own seed
            height, width = sizes[name]
            image = text2image([class_prompt], width=width, height=height, num_steps=int(sampling.get("num_steps", 40)),
                               guidance_scale=float(sampling.get("guidance_scale", 5.0)),
                               sampler=sampling.get("sampler", "EulerEDMSampler"),
                               seed=seed + int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100000)[0]
            save_image_atomic(Image.fromarray(image), Path(class_dir) / name)
            progress.update(1)
    progress.close()

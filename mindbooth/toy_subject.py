"""The quick-start's subject photos, written to a folder: one distinctive toy of the toy world (mindbooth/toy_world.py
`subject`) in several poses and backgrounds, so the quick-start needs no downloaded photos. No caption sidecars: the
run's --instance_prompt ("a photo of sks toy") names them."""
from pathlib import Path

from mindbooth.images import save_image_atomic
from mindbooth.toy_world import subject


def write_toy_images(folder, count: int = 5, size: int = 128, seed: int = 0):
    """`count` images of toy_world.subject(seed) as folder/toy_NN.png (existing files kept); returns their paths."""
    folder = Path(folder)
    paths = []
    for i, (image, _caption) in enumerate(subject(seed, count, size)):
        path = folder / f"toy_{i:02d}.png"
        if not path.exists():
            save_image_atomic(image, path)
        paths.append(path)
    return paths

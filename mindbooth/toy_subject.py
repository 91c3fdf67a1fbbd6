"""A distinctive subject drawn procedurally, so the quick-start needs no downloaded photos:
a yellow ball-shaped toy with red stripes and a blue cap, on varied backgrounds, positions and sizes."""
import numpy as np
from PIL import Image, ImageDraw


def draw_toy(rng: np.random.Generator, size: int) -> Image.Image:
    background = tuple(int(c) for c in rng.integers(60, 200, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.32)
    cx, cy = size * rng.uniform(0.38, 0.62), size * rng.uniform(0.45, 0.65)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(250, 210, 40), outline=(40, 30, 10), width=max(1, size // 64))
    for k in (-1, 0, 1):  # red stripes
        y = cy + k * radius * 0.45
        half = (radius**2 - (y - cy) ** 2) ** 0.5
        draw.line((cx - half, y, cx + half, y), fill=(210, 30, 30), width=max(2, size // 32))
    draw.pieslice((cx - radius * 0.8, cy - radius * 1.45, cx + radius * 0.8, cy - radius * 0.35), 180, 360, fill=(30, 60, 220))
    for dx in (-0.35, 0.35):  # eyes
        ex, ey = cx + dx * radius, cy - radius * 0.15
        draw.ellipse((ex - radius * 0.1, ey - radius * 0.1, ex + radius * 0.1, ey + radius * 0.1), fill=(20, 20, 20))
    return image


def write_toy_images(folder, count: int = 5, size: int = 128, seed: int = 0):
    from pathlib import Path

    from mindbooth.images import save_image_atomic

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"toy_{i:02d}.png"
        image = draw_toy(rng, size)
        if not path.exists():
            save_image_atomic(image, path)
        paths.append(path)
    return paths

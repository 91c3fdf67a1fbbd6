"""A toy world of captioned images drawn procedurally (no downloads): classes toy/cup/ball/house with varied colour,
pattern, shape, position, scale and background; deterministic from a seed. `subject(seed)` is one distinctive instance
seen in several poses/backgrounds, the stand-in for DreamBooth's subject photos."""
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("toy", "cup", "ball", "house")
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (245, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 130, 30), "white": (235, 235, 235), "black": (30, 30, 30)}
PATTERNS = ("plain", "striped", "dotted")


@dataclass(frozen=True)
class Item:
    cls: str
    colour: str
    accent: str  # second colour, used by the pattern
    pattern: str
    shape: float  # 0..1 aspect variation
    cx: float  # centre and scale as fractions of the image size
    cy: float
    scale: float
    background: tuple

    def caption(self) -> str:
        pattern = "" if self.pattern == "plain" else f"{self.pattern} "
        words = f"{self.colour} {pattern}{self.cls}"
        return f"a photo of {'an' if words[0] in 'aeiou' else 'a'} {words}"


def _pose(rng: np.random.Generator) -> dict:
    """Where and how big the object is and what it stands in front of: what varies between photos of one subject."""
    return dict(cx=float(rng.uniform(0.35, 0.65)), cy=float(rng.uniform(0.4, 0.6)), scale=float(rng.uniform(0.22, 0.34)),
                background=tuple(int(c) for c in rng.integers(60, 200, 3)))


def sample_item(rng: np.random.Generator) -> Item:
    names = list(COLOURS)
    colour, accent = rng.choice(len(names), 2, replace=False)
    return Item(cls=CLASSES[rng.integers(len(CLASSES))], colour=names[colour], accent=names[accent],
                pattern=PATTERNS[rng.integers(len(PATTERNS))], shape=float(rng.uniform()), **_pose(rng))


def draw(item: Item, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), item.background)
    d = ImageDraw.Draw(image)
    cx, cy, r = item.cx * size, item.cy * size, item.scale * size
    fill, accent, line = COLOURS[item.colour], COLOURS[item.accent], max(1, size // 32)
    w = r * (0.8 + 0.4 * item.shape)  # half-width varies with shape
    if item.cls == "ball":
        box = (cx - r, cy - r, cx + r, cy + r)
        d.ellipse(box, fill=fill)
    elif item.cls == "cup":
        box = (cx - w * 0.7, cy - r, cx + w * 0.7, cy + r)
        d.polygon([(box[0], box[1]), (box[2], box[1]), (cx + w * 0.5, box[3]), (cx - w * 0.5, box[3])], fill=fill)
        d.arc((box[2] - r * 0.4, cy - r * 0.5, box[2] + r * 0.5, cy + r * 0.4), 270, 90, fill=fill, width=2 * line)
    elif item.cls == "house":
        box = (cx - w, cy - r * 0.2, cx + w, cy + r)
        d.rectangle(box, fill=fill)
        d.polygon([(cx - w * 1.15, box[1]), (cx + w * 1.15, box[1]), (cx, cy - r)], fill=accent)
        d.rectangle((cx - r * 0.18, cy + r * 0.4, cx + r * 0.18, cy + r), fill=(60, 40, 20))
    else:  # toy: round body, cap, eyes
        box = (cx - w, cy - r * 0.8, cx + w, cy + r)
        d.ellipse(box, fill=fill)
        d.pieslice((cx - w * 0.8, cy - r * 1.3, cx + w * 0.8, cy - r * 0.3), 180, 360, fill=accent)
        for dx in (-0.35, 0.35):
            ex, ey = cx + dx * w, cy - r * 0.05
            d.ellipse((ex - r * 0.1, ey - r * 0.1, ex + r * 0.1, ey + r * 0.1), fill=(20, 20, 20))
    if item.pattern == "striped":
        for k in (-0.4, 0.0, 0.4):
            y = cy + k * r + (r * 0.3 if item.cls == "house" else 0)
            d.line((box[0] + line, y, box[2] - line, y), fill=accent, width=2 * line)
    elif item.pattern == "dotted":
        for dx, dy in ((-0.35, 0.2), (0.35, 0.2), (0.0, 0.55)):
            x, y = cx + dx * w, cy + dy * r
            d.ellipse((x - r * 0.12, y - r * 0.12, x + r * 0.12, y + r * 0.12), fill=accent)
    return image


def sample(seed: int, count: int, size: int = 64):
    """`count` captioned images [(PIL image, caption)], the same for the same seed."""
    rng = np.random.default_rng(seed)
    items = [sample_item(rng) for _ in range(count)]
    return [(draw(item, size), item.caption()) for item in items]


def subject(seed: int, count: int = 5, size: int = 64, cls: str = "toy"):
    """One distinctive instance (fixed class, colours, pattern, shape) in `count` poses/backgrounds."""
    rng = np.random.default_rng(seed)
    base = replace(sample_item(rng), cls=cls, pattern="striped")
    items = [replace(base, **_pose(rng)) for _ in range(count)]
    return [(draw(item, size), item.caption()) for item in items]

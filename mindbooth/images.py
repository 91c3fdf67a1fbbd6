"""Reading user images safely and writing images/grids atomically."""
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

TEMPORARY_MARK = ".tmp."  # atomic_write's temporary files: .<name>.tmp.<pid>.<random><suffix>
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(folder) -> list:
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def load_rgb(path) -> Image.Image:
    """Any image file as 8-bit RGB, EXIF rotation applied; transparent pixels composited on white."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}; remove or replace this file") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping (PIL's convert would saturate)
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8."""
    images = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return images.transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, num_cols: int) -> Image.Image:
    """(N, H, W, 3) uint8 -> one image, `num_cols` per row."""
    count, height, width, _ = images.shape
    num_cols = max(1, min(num_cols, count))
    rows = (count + num_cols - 1) // num_cols
    grid = Image.new("RGB", (num_cols * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % num_cols) * width, (i // num_cols) * height))
    return grid


def atomic_write(path, write_fn):
    """Write through a temporary file in the same folder, then rename: no half-written file is ever visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the suffix: some writers (ms.save_checkpoint) append one otherwise; it holds this
    # process's id, so that a later run can tell a killed writer's leftover (remove_stale_temporaries).
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMPORARY_MARK}{os.getpid()}.",
                                         suffix=path.suffix)
    os.close(handle)
    try:
        write_fn(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 (and MindSpore's read-only) -> a normal file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def remove_stale_temporaries(*folders) -> int:
    """Remove atomic_write's temporary files directly in `folders` whose writing process is gone: what a run
    killed while saving leaves. Returns how many were removed."""
    from mindbooth.processes import pid_suffix, process_alive

    removed = 0
    for folder in folders:
        for path in Path(folder).glob(f".*{TEMPORARY_MARK}*"):
            pid = pid_suffix(path.name, TEMPORARY_MARK)
            if path.is_file() and pid is not None and not process_alive(pid):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def save_image_atomic(image: Image.Image, path, overwrite: bool = False):
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite {path}")
    atomic_write(path, lambda temporary: image.save(temporary, format=_format_for(path)))


def _format_for(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")

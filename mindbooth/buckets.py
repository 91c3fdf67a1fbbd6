"""Aspect-ratio buckets (`--aspect_ratio_buckets True`): each image trains at the bucket of SDXL's ratio table
nearest its own aspect instead of a square crop, and a batch holds images of one bucket only.

The buckets are SDXL's table (the sampler's SD_XL_BASE_RATIOS, 1024^2-area sizes) scaled by resolution / 1024, so a
model trained at 512 gets the same ratios at 512^2-equivalent area. Rounding: the table's sides are multiples of 64
at 1024, so each scaled side is rounded to the nearest multiple of 64 * resolution / 1024, or of the model's
size_multiple (VAE factor x UNet downsampling) where that is larger: at 64 px (the tiny config) sides are multiples
of 32, and ratios that round to the same size are one bucket.
"""
import math

from mindbooth.images import load_rgb
from mindbooth.sampling_cli import SD_XL_BASE_RATIOS

TABLE_RESOLUTION = 1024  # the area SDXL's ratio table is drawn at
TABLE_SIDE_MULTIPLE = 64  # its sides are multiples of this


def bucket_sizes(resolution: int, multiple: int) -> list:
    """The buckets at `resolution` as sorted, distinct (height, width): SDXL's ratio table (its wide/tall entries
    and 1.0; not the 768/512 squares) scaled to resolution^2 area, sides rounded as the module says."""
    unit = max(int(multiple), TABLE_SIDE_MULTIPLE * int(resolution) // TABLE_RESOLUTION)
    scale = int(resolution) / TABLE_RESOLUTION

    def rounded(side):
        return max(unit, int(side * scale / unit + 0.5) * unit)

    table = [size for name, size in SD_XL_BASE_RATIOS.items() if "_" not in name]
    return sorted({(rounded(height), rounded(width)) for width, height in table})


def nearest_bucket(buckets, height: int, width: int) -> tuple:
    """The bucket (height, width) whose aspect is nearest the image's, by the log of the ratios (a portrait twice as
    tall is as far from square as a landscape twice as wide); ties go to the first of `buckets`."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[1] / bucket[0]) - aspect))


def image_buckets(paths, buckets) -> list:
    """The bucket of each image file (its size after EXIF rotation)."""
    result = []
    for path in paths:
        width, height = load_rgb(path).size
        result.append(nearest_bucket(buckets, height, width))
    return result


def class_image_sizes(instance_buckets, count: int) -> list:
    """The (height, width) to sample `count` new class images at: slot k at the bucket of instance image k mod n, so
    the class images follow the instance images' buckets (an item's class image is cropped to its instance's bucket)."""
    return [instance_buckets[k % len(instance_buckets)] for k in range(count)]

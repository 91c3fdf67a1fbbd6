"""Write an official-layout `.safetensors` (SDXL, or the model of any supported --config) filled with random finite
values (for tests and benchmarks).

    # full size (6.9 GB in fp16) from a key list `name:(d0, d1, ...)` such as MindONE's torch_key_base.yaml
    python tools/model_conversion/make_random_sdxl.py --keys ../shared/reference/sdxl_keys/mindone/model_conversion/torch_key_base.yaml --out /tmp/sdxl_random.safetensors
    # tiny, with the names and shapes a model config implies
    python tools/model_conversion/make_random_sdxl.py --config configs/inference/sd_xl_tiny.yaml --out /tmp/tiny.safetensors

The values are random bit patterns with the top exponent bit cleared: every value is finite, below 2
in magnitude, and zeros and subnormals occur, which makes bit-exact round trips a real test.
Written one tensor at a time, like the converter reads it.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mindbooth.tensor_dtypes import CHOICES, storage_dtype  # noqa: E402
from tools.model_conversion.conversion import atomic_output  # noqa: E402
from tools.model_conversion.safetensors_stream import TensorInfo, write_safetensors  # noqa: E402
from tools.model_conversion.file_layout import official_file_shapes  # noqa: E402
from tools.model_conversion.sdxl_layout import load_config  # noqa: E402


def read_key_list(path) -> dict:
    """`name:(d0, d1, ...)` lines -> {name: shape}."""
    shapes = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, _, shape = line.partition(":")
            shapes[name.strip()] = tuple(int(d) for d in shape.strip().strip("()").split(",") if d.strip())
    return shapes


def random_finite(shape, code, rng) -> np.ndarray:
    """Random bits of element type `code` (F16/BF16/F32) with the top exponent bit cleared."""
    dtype = np.dtype(storage_dtype(code))
    unsigned = {2: np.uint16, 4: np.uint32}[dtype.itemsize]
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.frombuffer(rng.bytes(n * dtype.itemsize), dtype=unsigned).copy()
    bits &= unsigned(~(1 << (8 * dtype.itemsize - 2)) & (2 ** (8 * dtype.itemsize) - 1))
    return bits.view(dtype).reshape(shape)


def write_random(out, shapes: dict, dtype="fp16", seed=0, overwrite=False):
    code = CHOICES[dtype]
    if code is None:
        raise ValueError("choose fp16, bf16 or fp32")
    rng = np.random.default_rng(seed)
    infos = [TensorInfo(name, code, tuple(shape)) for name, shape in shapes.items()]
    with atomic_output(out, overwrite) as f:
        write_safetensors(f, infos, lambda name: random_finite(shapes[name], code, rng))
    return sum(i.nbytes for i in infos)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--keys", help="key list with shapes, one `name:(d0, d1)` a line")
    source.add_argument("--config", help="model config whose architecture gives the names and shapes")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.keys:
        shapes = read_key_list(args.keys)
    else:
        shapes = official_file_shapes(load_config(args.config)["model"]["params"])
    size = write_random(args.out, shapes, args.dtype, args.seed, args.overwrite)
    print(f"wrote {args.out}: {len(shapes)} tensors, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

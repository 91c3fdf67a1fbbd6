"""Tensor element types across safetensors, MindSpore .ckpt and numpy, and casts between them.

numpy (<2, no ml_dtypes here) has no bfloat16, so bf16 data lives in numpy as its raw uint16 bits;
the element type travels beside the array as a safetensors dtype code ("F16", "BF16", ...).
"""
import numpy as np


class ConversionError(ValueError):
    """A problem with the user's input or output that the message explains in one line."""


# safetensors code -> (numpy storage dtype, MindSpore .ckpt `tensor_type`)
DTYPES = {
    "BOOL": (np.bool_, "Bool"), "U8": (np.uint8, "UInt8"), "I8": (np.int8, "Int8"), "I16": (np.int16, "Int16"),
    "U16": (np.uint16, "UInt16"), "F16": (np.float16, "Float16"), "BF16": (np.uint16, "BFloat16"),
    "I32": (np.int32, "Int32"), "U32": (np.uint32, "UInt32"), "F32": (np.float32, "Float32"),
    "F64": (np.float64, "Float64"), "I64": (np.int64, "Int64"), "U64": (np.uint64, "UInt64"),
}
FROM_MINDSPORE = {ms: code for code, (_, ms) in DTYPES.items()}
FLOATS = ("F16", "BF16", "F32", "F64")
# What the command line's --dtype means.
CHOICES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "keep": None}


def itemsize(code: str) -> int:
    return np.dtype(DTYPES[code][0]).itemsize


def storage_dtype(code: str):
    return DTYPES[code][0]


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's `.to(torch.bfloat16)`; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def cast(data: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert stored data from element type `src` to `dst` (codes). Exact when widening."""
    if src == dst:
        return data
    if src not in FLOATS or dst not in FLOATS:
        raise ConversionError(f"cannot cast {src} to {dst}: only floating-point tensors are converted")
    wide = _bf16_bits_to_f32(data) if src == "BF16" else data
    if dst == "BF16":
        return _f32_to_bf16_bits(wide.astype(np.float32, copy=False))
    return wide.astype(storage_dtype(dst))

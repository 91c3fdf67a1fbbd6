"""Read and write `.safetensors` one tensor at a time.

The format: 8 bytes little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, optional `"__metadata__"`),
then the tensor data, offsets counted from the end of the header.

The header is parsed here (not with `safe_open`) so that a bad file gets a precise message,
bf16 needs no framework, and nothing is memory-mapped: reading a tensor costs its own size.
The writer lays out a file byte for byte as the `safetensors` library does (it is tested
against it), so official -> ckpt -> official round trips are bit-identical.
"""
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from mindbooth.ckpt_stream import TensorFile, copy_range
from mindbooth.tensor_dtypes import DTYPES, ConversionError, itemsize, storage_dtype

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# The library writes tensors by element type (this order, highest first), then by name.
_WRITE_RANK = {code: i for i, code in enumerate(
    ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors code: "F16", "BF16", "F32", ...
    shape: tuple
    offset: int = 0     # absolute position of the data in the file (readers only)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


class SafetensorsReader(TensorFile):
    """Index of a safetensors file; `read(name)` loads one tensor (bf16 as uint16 bits)."""

    def __init__(self, path):
        super().__init__(path)
        size = self.size
        head = self._file.read(8)
        if len(head) < 8:
            self.close()
            raise ConversionError(f"not a safetensors file: {self.path} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            self.close()
            raise ConversionError(
                f"not a safetensors file: {self.path} (header length {n} does not fit the file size {size})")
        try:
            header = json.loads(self._file.read(n).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            self.close()
            raise ConversionError(f"not a safetensors file: {self.path} (the {n}-byte header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None)
        data_start, data_size = 8 + n, size - 8 - n
        spans = []
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                self.close()
                raise ConversionError(f"not a safetensors file: {self.path} (malformed header entry for '{name}')")
            if dtype not in DTYPES:
                self.close()
                raise ConversionError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            info = TensorInfo(name, dtype, shape, data_start + begin)
            if end - begin != info.nbytes or begin < 0:
                self.close()
                raise ConversionError(f"corrupt safetensors file: {self.path} ('{name}' {dtype}{list(shape)} needs "
                                      f"{info.nbytes} bytes, its offsets span {end - begin})")
            self.tensors[name] = info
            spans.append((begin, end))
        needed = max((end for _, end in spans), default=0)
        if needed > data_size:
            self.close()
            raise ConversionError(f"truncated file: {self.path} (its header describes {needed} bytes of tensor data, "
                                  f"only {data_size} are there; download it again)")
        if needed < data_size:
            self.close()
            raise ConversionError(f"corrupt safetensors file: {self.path} ({data_size - needed} bytes after the last "
                                  f"tensor)")
        spans.sort()
        if any(b != prev_end for (b, _), (_, prev_end) in zip(spans[1:], spans[:-1])) or (spans and spans[0][0]):
            self.close()
            raise ConversionError(f"corrupt safetensors file: {self.path} (tensor data ranges overlap or leave gaps)")

    def in_file_order(self):
        """Tensors in the order their data lies in the file (sequential reads)."""
        return sorted(self.tensors.values(), key=lambda t: t.offset)

    def read(self, name) -> np.ndarray:
        info = self.tensors[name]
        out = np.empty(info.nbytes, dtype=np.uint8)
        self._file.seek(info.offset)
        got = self._file.readinto(memoryview(out))
        if got != info.nbytes:
            raise ConversionError(f"truncated file: {self.path} (reading '{name}' got {got} of {info.nbytes} bytes)")
        return out.view(storage_dtype(info.dtype)).reshape(info.shape)


def write_order(infos):
    """The order in which the safetensors library lays tensors out."""
    return sorted(infos, key=lambda t: (-_WRITE_RANK[t.dtype], t.name))


def header_bytes(infos, metadata=None) -> bytes:
    """8-byte length + JSON header (padded with spaces to 8 bytes), for tensors in `write_order`."""
    header, offset = OrderedDict(), 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for t in infos:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(fileobj, infos, fetch, metadata=None, progress=None, where=None):
    """Write tensors `infos` (TensorInfo) to an open binary file; `fetch(name)` returns each one's data
    already in its target dtype (bf16 as uint16 bits). Only one tensor is held at a time.
    `where(name)`, if given, returns (file descriptor, offset) of bytes already laid out as the tensor's target,
    which the kernel then copies (as `cp` does), or None to `fetch` it."""
    infos = write_order(infos)
    fileobj.write(header_bytes(infos, metadata))
    for t in infos:
        source = where(t.name) if where is not None else None
        if source is not None:
            copy_range(source[0], fileobj, source[1], t.nbytes, t.name)
        else:
            data = np.ascontiguousarray(fetch(t.name))
            if data.nbytes != t.nbytes:
                raise ConversionError(f"internal: '{t.name}' has {data.nbytes} bytes, {t.nbytes} were announced")
            fileobj.write(data.reshape(-1).view(np.uint8))
        if progress is not None:
            progress.update(t.nbytes)

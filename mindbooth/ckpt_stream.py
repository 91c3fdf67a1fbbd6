"""Read and write MindSpore `.ckpt` files one tensor at a time, without importing MindSpore.

A `.ckpt` is one protobuf message (mindspore/train/checkpoint.proto):

    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

A repeated field's entries may simply follow one another, so a file is the concatenation of
one serialized `Checkpoint{value: [v]}` per entry: it can be written and read entry by entry.
MindSpore splits a tensor over 512 MiB into consecutive entries with the same tag, and
`save_checkpoint(..., crc_check=True)` appends a trailer `b"crc_num"` + 10-byte big-endian CRC32
(which `load_checkpoint` strips); both are handled here. Encrypted checkpoints are not.
"""
import errno
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from mindbooth.tensor_dtypes import DTYPES, FROM_MINDSPORE, ConversionError, cast, itemsize, storage_dtype

SLICE_BYTES = 512 * 1024 * 1024  # MindSpore's SLICE_SIZE: tensors above it span several entries
CRC_MARK = b"crc_num"
CRC_TRAILER_BYTES = len(CRC_MARK) + 10
_LEN, _VARINT = 2, 0  # protobuf wire types used here


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


def _len_field(field_number: int, payload: bytes) -> bytes:
    return _key(field_number, _LEN) + _varint(len(payload)) + payload


def entry_prefix(name: str, ms_type: str, shape, content_bytes: int) -> bytes:
    """Serialized `Checkpoint{value: [{tag, tensor{dims, tensor_type, tensor_content}}]}` up to the
    content bytes themselves, which follow it in the file."""
    dims = b"".join(_key(1, _VARINT) + _varint(int(d)) for d in shape)  # proto2 repeated: not packed
    tensor_head = dims + _len_field(2, ms_type.encode()) + _key(3, _LEN) + _varint(content_bytes)
    tensor_len = len(tensor_head) + content_bytes
    value_head = _len_field(1, name.encode("utf-8")) + _key(2, _LEN) + _varint(tensor_len) + tensor_head
    value_len = len(value_head) + content_bytes
    return _key(1, _LEN) + _varint(value_len) + value_head


class CkptWriter:
    """Appends tensors to an open binary file as MindSpore's `save_checkpoint` lays them out."""

    def __init__(self, fileobj, slice_bytes=SLICE_BYTES):
        self.file, self.slice_bytes = fileobj, slice_bytes

    def write(self, name: str, dtype: str, data: np.ndarray):
        """`dtype` is the safetensors code of `data` (bf16 data as uint16 bits)."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self._entries(name, dtype, data.shape, raw.nbytes,
                      lambda start, length: self.file.write(raw[start:start + length]))

    def copy(self, name: str, dtype: str, shape, src_fd: int, offset: int, nbytes: int):
        """As `write`, for data already laid out as `dtype` at `offset` of the open file `src_fd`: the kernel
        copies it (copy_file_range, as `cp` does), so it never passes through this process."""
        self._entries(name, dtype, shape, nbytes,
                      lambda start, length: copy_range(src_fd, self.file, offset + start, length, name))

    def _entries(self, name, dtype, shape, nbytes, write_content):
        """One entry per slice of at most `slice_bytes`: its header, then `write_content(start, length)`."""
        ms_type = DTYPES[dtype][1]
        for start in range(0, max(nbytes, 1), self.slice_bytes):
            length = min(self.slice_bytes, nbytes - start)
            self.file.write(entry_prefix(name, ms_type, shape, length))
            write_content(start, length)


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def copy_range(src_fd: int, dst, offset: int, nbytes: int, name: str = ""):
    """Append `nbytes` of `src_fd` from `offset` to the open binary file `dst`: in the kernel where it can, else
    by reads. `dst` is flushed first, since the kernel writes at its file descriptor's position."""
    dst.flush()
    dst_fd = dst.fileno()
    done = 0
    while done < nbytes:
        try:
            got = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            got = os.write(dst_fd, os.pread(src_fd, min(nbytes - done, 64 << 20), offset + done))
        if got == 0:
            raise ConversionError(f"input ended while copying '{name}' ({done} of {nbytes} bytes)")
        done += got


@dataclass
class CkptTensor:
    name: str
    dtype: str                       # safetensors code
    shape: tuple
    pieces: list = field(default_factory=list)  # (absolute offset, length) of each content slice

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.pieces)


class _Cursor:
    """Protobuf field reader over a region of a file, which can skip large fields without reading them."""

    def __init__(self, f, path, end):
        self.f, self.path, self.end = f, path, end

    @property
    def pos(self):
        return self.f.tell()

    def varint(self) -> int:
        shift = value = 0
        while True:
            b = self.f.read(1)
            if not b:
                raise ConversionError(f"truncated checkpoint: {self.path} (ends inside an entry at byte {self.pos})")
            value |= (b[0] & 0x7F) << shift
            if b[0] < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ConversionError(f"not a MindSpore checkpoint: {self.path} (bad varint at byte {self.pos})")

    def length(self) -> int:
        n = self.varint()
        if self.pos + n > self.end:
            raise ConversionError(f"truncated checkpoint: {self.path} (an entry at byte {self.pos} needs {n} bytes, "
                                  f"the file or enclosing entry ends at {self.end})")
        return n

    def bytes(self, n) -> bytes:
        return self.f.read(n)

    def skip(self, wire_type):
        if wire_type == _VARINT:
            self.varint()
        elif wire_type == _LEN:
            self.f.seek(self.length(), os.SEEK_CUR)
        elif wire_type in (1, 5):
            self.f.seek(8 if wire_type == 1 else 4, os.SEEK_CUR)
        else:
            raise ConversionError(f"not a MindSpore checkpoint: {self.path} (wire type {wire_type} at byte {self.pos})")

    def fields(self):
        """Yield (field number, wire type) until the region ends."""
        while self.pos < self.end:
            key = self.varint()
            yield key >> 3, key & 7


class TensorFile:
    """A weight file open for reading one tensor at a time (`.ckpt` here, `.safetensors` in the conversion tools):
    its `tensors` index (name -> entry with a `shape`), and use as a context manager that closes the file."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ConversionError(f"input not found: {self.path}")
        self.size = os.path.getsize(self.path)
        self._file = open(self.path, "rb")
        self.tensors = OrderedDict()

    def shapes(self) -> dict:
        return {name: t.shape for name, t in self.tensors.items()}

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CkptReader(TensorFile):
    """Index of a `.ckpt` (names, dtypes, shapes, where the bytes are); `read(name)` loads one tensor."""

    def __init__(self, path):
        super().__init__(path)
        self.has_crc = False
        try:
            self.tensors = self._index()
        except UnicodeDecodeError:
            self.close()
            raise ConversionError(f"not a MindSpore checkpoint: {self.path} (an entry name is not text)")
        except BaseException:
            self.close()
            raise

    def _index(self):
        f, size = self._file, self.size
        tensors, last = OrderedDict(), None
        top = _Cursor(f, self.path, size)
        while top.pos < size:
            start = top.pos
            if size - start == CRC_TRAILER_BYTES and f.read(len(CRC_MARK)) == CRC_MARK:
                self.has_crc = True
                f.seek(size)
                break
            f.seek(start)
            key = top.varint()
            if key != (1 << 3 | _LEN):
                raise ConversionError(f"not a MindSpore checkpoint: {self.path} (byte {start} starts field {key >> 3} "
                                      f"wire type {key & 7}, expected a Checkpoint.value entry)")
            length = top.length()
            tag, ms_type, dims, content = self._value(_Cursor(f, self.path, top.pos + length))
            if ms_type not in FROM_MINDSPORE:
                raise ConversionError(f"{self.path}: '{tag}' has unsupported tensor_type {ms_type!r}")
            if tag == last:
                tensors[tag].pieces.append(content)  # a slice of a large tensor
                continue
            if tag in tensors:
                raise ConversionError(f"corrupt checkpoint: {self.path} ('{tag}' appears twice)")
            tensors[tag] = CkptTensor(tag, FROM_MINDSPORE[ms_type], tuple(dims), [content])
            last = tag
        for t in tensors.values():
            expected = int(np.prod(t.shape, dtype=np.int64)) * itemsize(t.dtype)
            if t.shape == (0,) and t.nbytes == itemsize(t.dtype):
                t.shape = ()  # MindSpore writes some scalars with dims [0]
            elif t.nbytes != expected:
                raise ConversionError(f"corrupt checkpoint: {self.path} ('{t.name}' {t.dtype}{list(t.shape)} needs "
                                      f"{expected} bytes, the file holds {t.nbytes})")
        return tensors

    def _value(self, cur):
        """Parse one Checkpoint.Value (the region of `cur`); returns tag, tensor_type, dims, (offset, length)."""
        tag = ms_type = content = None
        dims = []
        for number, wire in cur.fields():
            if number == 1 and wire == _LEN:
                tag = cur.bytes(cur.length()).decode("utf-8")
            elif number == 2 and wire == _LEN:
                length = cur.length()
                inner = _Cursor(self._file, self.path, cur.pos + length)
                for n, w in inner.fields():
                    if n == 1 and w == _VARINT:
                        dims.append(inner.varint())
                    elif n == 1 and w == _LEN:  # packed dims, also valid protobuf
                        length = inner.length()
                        packed = _Cursor(self._file, self.path, inner.pos + length)
                        while packed.pos < packed.end:
                            dims.append(packed.varint())
                    elif n == 2 and w == _LEN:
                        ms_type = inner.bytes(inner.length()).decode("utf-8")
                    elif n == 3 and w == _LEN:
                        length = inner.length()
                        content = (inner.pos, length)
                        self._file.seek(length, os.SEEK_CUR)
                    else:
                        inner.skip(w)
            elif number == 3:
                raise ConversionError(f"{self.path}: '{tag}' is a MapParameter (maptensor), which is not converted")
            else:
                cur.skip(wire)
        if tag is None or ms_type is None or content is None:
            raise ConversionError(f"not a MindSpore checkpoint: {self.path} (incomplete entry ending at byte {cur.end})")
        return tag, ms_type, dims, content

    def read(self, name) -> np.ndarray:
        t = self.tensors[name]
        out = np.empty(t.nbytes, dtype=np.uint8)
        view, at = memoryview(out), 0
        for offset, length in t.pieces:
            self._file.seek(offset)
            if self._file.readinto(view[at:at + length]) != length:
                raise ConversionError(f"truncated checkpoint: {self.path} (reading '{name}')")
            at += length
        return out.view(storage_dtype(t.dtype)).reshape(t.shape)

    def verify_crc(self) -> bool:
        """Check a `crc_num` trailer, if there is one (reads the whole file). False when absent."""
        if not self.has_crc:
            return False
        self._file.seek(0)
        crc, left = 0, self.size - CRC_TRAILER_BYTES
        while left:
            chunk = self._file.read(min(left, 64 << 20))
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        stored = int.from_bytes(self._file.read(CRC_TRAILER_BYTES)[len(CRC_MARK):], "big")
        if crc != stored:
            raise ConversionError(f"corrupt checkpoint: {self.path} (CRC32 {crc} does not match the stored {stored})")
        return True


def iter_arrays(path, names=None):
    """Yield (name, numpy array) from a `.ckpt` one tensor at a time, in file order: a loader that
    holds one tensor beside the model (`mindspore.load_checkpoint` holds about twice the file).
    bf16 tensors come as float32 (exact), since numpy has no bf16. `names`: only these."""
    wanted = None if names is None else set(names)
    with CkptReader(path) as reader:
        for name, t in reader.tensors.items():
            if wanted is None or name in wanted:
                data = reader.read(name)
                yield name, cast(data, "BF16", "F32") if t.dtype == "BF16" else data

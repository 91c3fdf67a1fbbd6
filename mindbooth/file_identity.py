"""What identifies a weight file between uses: a key that changes when the file is rewritten.

The sampler reuses a loaded model while its files keep their identity; the trainer's compile cache is named
by it (a tuple, so it is hashable and serialises to JSON as a list).
"""
from pathlib import Path
from typing import NamedTuple


class FileIdentity(NamedTuple):
    path: str       # resolved
    size: int
    mtime_ns: int


def file_identity(path) -> FileIdentity:
    """(resolved path, size, mtime) of a weight file; FileNotFoundError if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    stat = path.stat()
    return FileIdentity(str(path.resolve()), stat.st_size, stat.st_mtime_ns)

"""CLIP byte-level BPE tokenizer shared by SDXL's two text encoders (CLIP ViT-L and OpenCLIP bigG).

Both encoders use the same 49408-token vocabulary; they differ only in the padding id:
CLIP-L pads with `<|endoftext|>` (49407), OpenCLIP bigG pads with 0. The vocabulary file ships
next to this module (see VOCAB_LICENSE.md), so nothing is downloaded at run time.
"""
import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# The file holds more merges than CLIP was trained with; CLIP uses the first
# 49152 - 256 - 2 so that bytes (256, twice: plain and `</w>`) + merges + 2 specials = 49408.
NUM_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits,
# runs of other non-space symbols.
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """Byte value -> printable unicode char, so every byte string is a string BPE can work on.

    Printable latin-1 bytes map to themselves; the rest are shifted to chars from 256 upwards.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=None)
def load_vocab(path: str = str(VOCAB_FILE)):
    """Read the BPE file once per process -> (token -> id dict, merge pair -> rank dict)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    encoder = {tok: i for i, tok in enumerate(tokens)}
    ranks = {pair: i for i, pair in enumerate(merges)}
    return encoder, ranks


def clean_text(text: str) -> str:
    """CLIP's cleaning: fix mojibake, unescape HTML (twice, as CLIP does), collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """Text -> int32 ids of shape (N, max_length): BOS + BPE ids + EOS, truncated (EOS kept last), padded."""

    def __init__(self, max_length: int = 77, pad_with_eos: bool = True):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        self.max_length = max_length
        self.pad_with_eos = bool(pad_with_eos)
        self.encoder, self.bpe_ranks = load_vocab()
        self.byte_encoder = bytes_to_unicode()
        # Special tokens matched by the word pattern map to themselves; everything else is BPE'd once.
        self._bpe_cache = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}

    @property
    def bos_id(self) -> int:
        return self.encoder[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.encoder[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.eos_id if self.pad_with_eos else 0

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> str:
        """One pre-tokenized word (already byte-mapped) -> space-separated BPE pieces; cached."""
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        # The last symbol carries the end-of-word marker, so word-final pieces get their `</w>` ids.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = " ".join(parts)
        self._bpe_cache[word] = result
        return result

    def encode(self, text: str) -> list:
        """Text -> BPE ids, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(mapped).split(" "))
        return ids

    def __call__(self, texts) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"CLIPTokenizer expects a str or a list of str, got {type(texts).__name__}"
                + (f" containing {sorted({type(t).__name__ for t in texts if not isinstance(t, str)})}"
                   if isinstance(texts, (list, tuple)) else "")
            )
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_id] + self.encode(text)[: self.max_length - 2] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out

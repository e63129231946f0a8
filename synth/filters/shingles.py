"""Text → normalised form → tokens → shingle hashes: what exact and near-duplicate detection compare.

Normalisation is Unicode NFKC, lower case, punctuation (Unicode categories P*) turned
into spaces, whitespace collapsed. A token is a word, or a single character of Chinese or
Japanese text (written without spaces); a shingle is `size` consecutive tokens (sizes
differ for word and character text).
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata

import numpy as np

# Scripts written without spaces between words: each character is a token.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_HAS_CJK = re.compile(rf"[{_CJK}]")
_PUNCT: dict[int, str] | None = None
_U32 = np.uint32


def _punctuation_table() -> dict[int, str]:
    """Every Unicode punctuation code point (categories P*) mapped to a space; built once (~0.1 s)."""
    global _PUNCT
    if _PUNCT is None:
        _PUNCT = {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P"}
    return _PUNCT


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation turned into spaces, whitespace collapsed: the form exact dedup compares."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().translate(_punctuation_table()).split())


def tokenize(normalized: str) -> list[str]:
    """Words, with every Chinese/Japanese character a token of its own."""
    return _TOKEN.findall(normalized)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of distinct values."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class Shingler:
    """Turns texts into sets of shingle hashes: the sets near-duplicate detection compares."""

    def __init__(self, shingle_size: int = 2, char_shingle_size: int = 2):
        self.shingle_size = shingle_size
        self.char_shingle_size = char_shingle_size
        self._cache: dict[str, int] = {}

    def shingle_set(self, text: str) -> np.ndarray:
        """Sorted distinct 32-bit hashes of `text`'s shingles (empty when it has no tokens)."""
        norm = normalize(text)
        toks = tokenize(norm)
        flat = np.asarray(self.hash_tokens(toks), dtype=np.uint64)
        return np.unique(self.shingles(flat, np.array([len(toks)]), np.array([self.size(norm)])))

    def similarity(self, a: str, b: str) -> float:
        """Jaccard similarity of two texts' shingle sets (1.0 for two texts without tokens)."""
        x, y = self.shingle_set(a), self.shingle_set(b)
        return jaccard(x, y) if x.size or y.size else 1.0

    def size(self, normalized: str) -> int:
        """Shingle size for one text: characters are far shorter units than words."""
        return self.char_shingle_size if _HAS_CJK.search(normalized) else self.shingle_size

    def hash_tokens(self, toks: list[str]) -> list[int]:
        """64-bit blake2b of each token, memoised."""
        cache = self._cache
        if len(cache) > 2_000_000:  # bound memory on huge vocabularies; hashes are recomputed identically
            cache.clear()
        out = []
        for t in toks:
            h = cache.get(t)
            if h is None:
                h = cache[t] = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            out.append(h)
        return out

    def shingles(self, flat: np.ndarray, lengths: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """32-bit hashes of each text's shingles of `sizes[i]` tokens, texts one after another.

        `flat` holds every text's token hashes in turn; a text shorter than its shingle size is one shingle.
        """
        # A fixed width (not the batch's widest shingle) so a text hashes the same in any batch.
        width = max(self.shingle_size, self.char_shingle_size)
        counts = np.where(lengths > 0, np.maximum(lengths - sizes + 1, 1), 0)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        # Start position (in `flat`) of every shingle, and how many tokens its text has left from there.
        first = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
        left = np.minimum(np.repeat(starts + lengths, counts) - first, np.repeat(sizes, counts))
        h = np.zeros(len(first), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(width):
                part = flat[np.minimum(first + j, len(flat) - 1)] if len(flat) else np.zeros(len(first), np.uint64)
                # Positions past a shingle's size or its text's end add a fixed value.
                part = np.where(j < left, part, np.uint64(0x9E3779B97F4A7C15))
                h = h * np.uint64(0x100000001B3) + part
            h ^= h >> np.uint64(32)
        return (h & np.uint64(0xFFFFFFFF)).astype(_U32)

"""Exact and near-duplicate filtering of short texts (instructions), incrementally.

Exact: texts are equal after normalisation (Unicode NFKC, lower case, punctuation
removed, whitespace collapsed); a 64-bit digest of the normalised text is kept per
accepted text.

Near: MinHash signatures of the set of token shingles (`shingle_size` consecutive
tokens; a token is a word, or a single character of Chinese or Japanese text, so
text without spaces is shingled on characters) are indexed in datasketch's
`MinHashLSH`. LSH only proposes candidates: each is checked with the exact Jaccard
similarity of the two shingle sets (kept compactly, ~100 bytes a text), so a
near-duplicate is one whose shingle Jaccard reaches `threshold`. LSH decides recall
(a pair it never proposes is missed); the exact check makes every drop justified.

Hashing is the hot path: datasketch's `MinHash.update` costs a numpy call per
shingle. Here tokens are hashed once (blake2b, memoised), shingle hashes are
combined with numpy over a whole batch of texts, and the permutations are applied
to every shingle of the batch at once. The permutations are datasketch's own
("affine32" scheme: MurmurHash3 finalizer, then a*h+b mod 2^32), so a signature
equals `MinHash(num_perm, seed, hashfunc=identity).update_batch(shingle_hashes)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Collection, Hashable, Iterable, Iterator, Literal

import numpy as np
from datasketch import LeanMinHash, MinHash
from pydantic import BaseModel, ConfigDict, Field

from synth.errors import ConfigError
from synth.filters.lsh import CompactLSH
from synth.filters.shingles import Shingler, jaccard, normalize, tokenize

__all__ = ["DedupSettings", "DedupStats", "Deduplicator", "Duplicate", "Shingler", "dedup_texts", "jaccard", "normalize", "tokenize"]

_U32 = np.uint32
_SCHEME = "affine32"  # datasketch >= 2.0: a*h+b mod 2^32 after a MurmurHash3 finalizer


class DedupSettings(BaseModel):
    """How duplicates are found."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="Drop texts equal to an accepted one after normalisation (case, punctuation, spacing, NFKC).")
    near: bool = Field(True, description="Drop texts whose shingle sets are near an accepted one's (MinHash LSH).")
    threshold: float = Field(0.6, gt=0.0, le=1.0, description="Jaccard similarity of shingle sets at or above which texts are near-duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more is more accurate and slower.")
    shingle_size: int = Field(2, ge=1, le=16, description="Words per shingle.")
    char_shingle_size: int = Field(2, ge=1, le=16, description="Tokens per shingle in text with Chinese/Japanese characters, where each character is a token.")
    recall_weight: float = Field(0.8, ge=0.0, le=1.0, description="Weight of missed pairs against needless candidates when choosing LSH bands (candidates are checked exactly, so recall is what LSH costs).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


@dataclass(frozen=True)
class Duplicate:
    """An accepted text that a new one duplicates."""

    key: Hashable
    kind: Literal["exact", "near"]
    similarity: float

    def describe(self) -> str:
        """A reason for a rejects file."""
        if self.kind == "exact":
            return f"duplicate: same as {self.key} (equal after normalisation)"
        return f"duplicate: near {self.key} (shingle Jaccard {self.similarity:.2f})"


@dataclass
class DedupStats:
    """Counts since the filter was made."""

    seen: int = 0
    kept: int = 0
    exact: int = 0
    near: int = 0

    def line(self) -> str:
        """One line for a command's summary."""
        return f"dedup: {self.seen} seen, {self.kept} kept, {self.exact} exact duplicates, {self.near} near duplicates"


@dataclass
class _Prepared:
    """What matching needs about one text, computed before (and independently of) the index."""

    digest: bytes
    signature: np.ndarray | None  # None when the text has no tokens
    shingles: np.ndarray | None  # sorted distinct shingle hashes, None when the text has no tokens


class Deduplicator:
    """Accepts texts one by one, refusing those that duplicate anything accepted before.

    `add(key, text)` returns None (accepted and indexed) or the key of the accepted text it
    duplicates; `add_many` does the same for a stream, hashing in batches (much faster).
    """

    def __init__(self, config: DedupSettings | None = None):
        self.config = config or DedupSettings()
        c = self.config
        try:
            a, b = MinHash(num_perm=c.num_perm, seed=c.seed, scheme=_SCHEME).permutations
        except TypeError:
            raise ConfigError("near-duplicate filtering needs datasketch >= 2.0 (its affine32 MinHash scheme)") from None
        self._a = np.asarray(a, dtype=_U32)
        self._b = np.asarray(b, dtype=_U32)
        self._lsh = CompactLSH(c.threshold, c.num_perm, (round(1 - c.recall_weight, 6), c.recall_weight))
        self._digests: dict[bytes, int] = {}
        self._keys: list[Hashable] = []
        self._sets: list[bytes | None] = []  # each accepted text's shingle set (uint32 bytes): 1M texts ~ 120 MB
        self.shingler = Shingler(c.shingle_size, c.char_shingle_size)
        self.stats = DedupStats()

    def __len__(self) -> int:
        """How many texts have been accepted."""
        return len(self._keys)

    # -- the public operations -------------------------------------------------
    def add(self, key: Hashable, text: str) -> Hashable | None:
        """Accept `text` under `key` unless it duplicates an accepted text; then return that text's key."""
        found = self.offer(key, text)
        return None if found is None else found.key

    def offer(self, key: Hashable, text: str, ignore: Collection[Hashable] = ()) -> Duplicate | None:
        """`add`, returning the Duplicate found (kind, similarity); texts under keys in `ignore` do not count."""
        (found,) = self._add_prepared([(key, p) for p in self._prepare([text])], ignore)
        return found

    def add_many(self, items: Iterable[tuple[Hashable, str]], batch: int = 2048) -> Iterator[Duplicate | None]:
        """`add` for each (key, text) in order, yielding None or the Duplicate found; hashes `batch` texts at a time."""
        chunk: list[tuple[Hashable, str]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= batch:
                yield from self._add_prepared(list(zip((k for k, _ in chunk), self._prepare([t for _, t in chunk]))))
                chunk = []
        if chunk:
            yield from self._add_prepared(list(zip((k for k, _ in chunk), self._prepare([t for _, t in chunk]))))

    def check(self, text: str, ignore: Collection[Hashable] = ()) -> Duplicate | None:
        """The accepted text that `text` duplicates (other than those under keys in `ignore`), without accepting it."""
        (prepared,) = self._prepare([text])
        return self._match(prepared, self._lean(prepared.signature), ignore)

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature of `text` (num_perm uint32 values), or None when it has no tokens."""
        return self._prepare([text])[0].signature

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The sorted distinct 32-bit hashes of `text`'s shingles (what the signature is the MinHash of)."""
        return self.shingler.shingle_set(text)

    # -- matching and indexing ---------------------------------------------------
    def _add_prepared(self, items: list[tuple[Hashable, _Prepared]], ignore: Collection[Hashable] = ()) -> list[Duplicate | None]:
        out = []
        for key, prepared in items:
            lean = self._lean(prepared.signature)
            found = self._match(prepared, lean, ignore)
            self.stats.seen += 1
            if found is None:
                self._insert(key, prepared, lean)
                self.stats.kept += 1
            elif found.kind == "exact":
                self.stats.exact += 1
            else:
                self.stats.near += 1
            out.append(found)
        return out

    def _match(self, p: _Prepared, lean: LeanMinHash | None, ignore: Collection[Hashable] = ()) -> Duplicate | None:
        if self.config.exact:
            index = self._digests.get(p.digest)
            if index is not None and not (ignore and self._keys[index] in ignore):
                return Duplicate(self._keys[index], "exact", 1.0)
        if lean is None or not self._keys:
            return None
        candidates = self._lsh.query(lean)
        if not candidates:
            return None
        # LSH candidates are approximate: the exact Jaccard of the shingle sets decides.
        # Sorted, so of equally similar texts the earliest wins: the answer is deterministic.
        cands = sorted(i for i in candidates if not (ignore and self._keys[i] in ignore))
        if not cands:
            return None
        sims = _jaccards(p.shingles, [self._sets[i] for i in cands])
        best = int(np.argmax(sims))
        if sims[best] < self.config.threshold:
            return None
        return Duplicate(self._keys[cands[best]], "near", float(sims[best]))

    def _insert(self, key: Hashable, p: _Prepared, lean: LeanMinHash | None) -> None:
        index = len(self._keys)
        self._keys.append(key)
        self._digests.setdefault(p.digest, index)
        if lean is not None:
            self._sets.append(p.shingles.tobytes())
            self._lsh.insert(index, lean, check_duplication=False)
        else:
            self._sets.append(None)

    def _lean(self, signature: np.ndarray | None) -> LeanMinHash | None:
        if signature is None or not self.config.near:
            return None
        # The constructor re-validates values computed right here (~9 us, a tenth of the per-text cost): set the slots.
        lean = LeanMinHash.__new__(LeanMinHash)
        lean.seed, lean.scheme, lean.hashvalues = self.config.seed, _SCHEME, signature
        return lean

    # -- hashing -----------------------------------------------------------------
    def _prepare(self, texts: list[str]) -> list[_Prepared]:
        """Digests and signatures of a batch of texts, hashed together."""
        norms = [normalize(t) for t in texts]
        digests = [hashlib.blake2b(n.encode(), digest_size=8).digest() for n in norms]
        if not self.config.near:
            return [_Prepared(d, None, None) for d in digests]
        toks = [tokenize(n) for n in norms]
        lengths = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        sh = self.shingler
        flat = np.fromiter((h for t in toks for h in sh.hash_tokens(t)), dtype=np.uint64, count=int(lengths.sum()))
        sizes = np.fromiter((sh.size(n) for n in norms), dtype=np.int64, count=len(norms))
        shingles = sh.shingles(flat, lengths, sizes)
        counts = np.where(lengths > 0, np.maximum(lengths - sizes + 1, 1), 0)
        sigs = self._minhash(shingles, counts)
        out, row, start = [], 0, 0
        for digest, count in zip(digests, counts):
            if count:
                out.append(_Prepared(digest, sigs[row], np.unique(shingles[start : start + count])))
                row += 1
                start += count
            else:
                out.append(_Prepared(digest, None, None))
        return out

    def _minhash(self, shingles: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """One signature row per text with shingles: min over its shingles of a*fmix32(h)+b (mod 2^32)."""
        nonzero = counts[counts > 0]
        if not len(nonzero):
            return np.zeros((0, len(self._a)), dtype=_U32)
        hv = _fmix32(shingles)
        with np.errstate(over="ignore"):
            # (permutation, shingle) so each text's shingles are contiguous: reduceat is ~4x faster this way round.
            phv = self._a[:, None] * hv[None, :] + self._b[:, None]
        offsets = np.concatenate(([0], np.cumsum(nonzero)[:-1]))
        return np.ascontiguousarray(np.minimum.reduceat(phv, offsets, axis=1).T)


def _jaccards(query: np.ndarray, blobs: list[bytes]) -> np.ndarray:
    """Exact Jaccard of one sorted shingle set against many (uint32 bytes), in a few numpy calls.

    One call per candidate (np.intersect1d) was most of the filter's time at a million texts.
    """
    sizes = np.fromiter((len(b) // 4 for b in blobs), dtype=np.int64, count=len(blobs))
    flat = np.frombuffer(b"".join(blobs), dtype=_U32)
    pos = np.minimum(np.searchsorted(query, flat), query.size - 1)
    hits = (query[pos] == flat).astype(np.int64)
    inter = np.add.reduceat(hits, np.concatenate(([0], np.cumsum(sizes)[:-1])))
    return inter / (sizes + query.size - inter)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before its affine32 permutations."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> _U32(16))
        h = h * _U32(0x85EBCA6B)
        h = h ^ (h >> _U32(13))
        h = h * _U32(0xC2B2AE35)
        return h ^ (h >> _U32(16))


def dedup_texts(texts: Iterable[str], config: DedupSettings | None = None) -> tuple[list[int], DedupStats]:
    """Indices of the texts that survive, in order, and the stats: a one-call helper."""
    d = Deduplicator(config)
    kept = [i for i, found in enumerate(d.add_many(enumerate(texts))) if found is None]
    return kept, d.stats

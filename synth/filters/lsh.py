"""datasketch's MinHashLSH over compact in-memory buckets, for indexes of millions of short texts."""

from __future__ import annotations

import numpy as np
from datasketch import MinHashLSH
from datasketch.storage import OrderedStorage, UnorderedStorage


class _Buckets(UnorderedStorage):
    """One LSH band's buckets, compactly: a bucket holding one key is that key, a list once it holds more.

    datasketch's dict storage keeps a Python set per bucket and, per key, a list of its band
    hashes: about 5 KiB per text at 128 permutations, over 5 GiB for a million texts.
    """

    def __init__(self):
        self._d: dict = {}

    def keys(self):
        """The band hashes held."""
        return self._d.keys()

    def get(self, key):
        """The keys in one bucket."""
        v = self._d.get(key)
        return () if v is None else v if isinstance(v, list) else (v,)

    def insert(self, key, *vals, **kwargs):
        """Add keys to a bucket."""
        v = self._d.get(key)
        if v is None and len(vals) == 1:
            self._d[key] = vals[0]
        elif v is None:
            self._d[key] = list(vals)
        elif isinstance(v, list):
            v.extend(vals)
        else:
            self._d[key] = [v, *vals]

    def remove(self, *keys, **kwargs):
        """Not supported: the filter never forgets a text."""
        raise NotImplementedError

    remove_val = remove

    def size(self) -> int:
        """Number of buckets."""
        return len(self._d)

    def itemcounts(self, **kwargs) -> dict:
        """Keys per bucket."""
        return {k: len(v) if isinstance(v, list) else 1 for k, v in self._d.items()}

    def has_key(self, key) -> bool:
        """Whether a bucket exists."""
        return key in self._d


class _NoKeys(OrderedStorage):
    """The per-key record of band hashes, kept by datasketch only for removal, which the filter never does."""

    def keys(self):
        """Nothing is kept."""
        return ()

    def get(self, key):
        """Nothing is kept."""
        return []

    def insert(self, key, *vals, **kwargs):
        """Forget it."""

    def remove(self, *keys, **kwargs):
        """Not supported."""
        raise NotImplementedError

    remove_val = remove

    def size(self) -> int:
        """Nothing is kept."""
        return 0

    def itemcounts(self, **kwargs) -> dict:
        """Nothing is kept."""
        return {}

    def has_key(self, key) -> bool:
        """Nothing is kept."""
        return False


class CompactLSH(MinHashLSH):
    """datasketch's MinHashLSH (its banding, insert and query) over compact in-memory buckets.

    A band's bucket key is Python's 64-bit `hash` of its values' bytes (datasketch byte-swaps
    them for storage portability first, five times slower): the index lives only in this
    process, and every candidate is checked against its shingle set anyway.
    """

    def __init__(self, threshold: float, num_perm: int, weights: tuple[float, float]):
        super().__init__(threshold=threshold, num_perm=num_perm, weights=weights)
        self.hashtables = [_Buckets() for _ in range(self.b)]
        self.keys = _NoKeys()
        self._H = _band_key


def _band_key(values: np.ndarray) -> int:
    return hash(values.tobytes())

"""What a local model's weights are, cheaply: part of a local teacher's cache identity."""

from __future__ import annotations

import hashlib
from pathlib import Path


def directory_fingerprint(path: Path) -> str:
    """Names, sizes and mtimes of the files in a model directory, hashed (checkpoint subfolders ignored).

    Retrained weights saved at the same path get another fingerprint, so their answers are
    never served from the cache of the old ones.
    """
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            st = f.stat()
            digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]

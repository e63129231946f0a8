"""The local files and model directories a stage's settings name, hashed by what is in them.

A setting names a local input when it is a path (`data.jsonl`, `out/student`), a model spec with
a path (`hf:PATH`, `vllm:PATH`), or a YAML file (a teacher file, a --config) whose values name
paths in turn (a teacher mapping's `model: /models/llama`). Each is hashed by content: copying a
model elsewhere leaves its hash as it was, retraining it in place changes it.

Every file is read in full (a partial digest misses a fine-tune that leaves the first and last
blocks alone, e.g. frozen embeddings). Big files are read once: their digest is kept under
the cache home, keyed by path, size, inode, mtime and ctime, so a later run rereads only
files written since.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Setting and config keys that name where a stage writes (or its response cache), never what it reads.
NOT_INPUTS = frozenset({"output", "output_dir", "out", "cache_dir", "logging_dir"})
#: Model specs that carry a path: `hf:/models/x`, `vllm:/models/x`.
_MODEL_SPEC = re.compile(r"^(hf|vllm):")
#: Files at least this big keep their digest between runs.
KEEP_DIGEST_BYTES = 32 << 20
#: A file written this recently may still change within the filesystem's timestamp granularity:
#: its digest is not kept (git's "racy clean" rule).
_SETTLED_S = 2.0
_KEPT_MAX = 512
_kept: dict[str, dict[str, Any]] | None = None


def named_inputs(value: str) -> Iterator[Path]:
    """The local files and folders a setting's value names: itself, a spec's path, and what a YAML file names."""
    yield from _named(value, set())


def content_hash(path: Path) -> str:
    """A file by its bytes; a folder (a model) by each file's relative name, size and bytes.

    Training checkpoints (`checkpoint-*`) and hidden files (`.cache/` download metadata) are left out:
    they change without changing the model.
    """
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or any(p.startswith((".", "checkpoint-")) for p in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{f.stat().st_size}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes; a big file's digest is reused while its path and stat are unchanged."""
    st = path.stat()
    if st.st_size < KEEP_DIGEST_BYTES:
        return _sha256(path)
    key = str(path.resolve())
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    kept = _kept_digests()
    entry = kept.get(key)
    if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = _sha256(path)
    if time.time() - max(st.st_mtime_ns, st.st_ctime_ns) / 1e9 > _SETTLED_S:
        kept.pop(key, None)
        kept[key] = {"stat": stamp, "sha256": digest}
        _save_kept(kept)
    return digest


def kept_digests_path() -> Path:
    """Where big files' digests are kept between runs: $BBD_DIGEST_CACHE, else in the cache home."""
    from synth.paths import cache_home

    explicit = os.environ.get("BBD_DIGEST_CACHE")
    return Path(explicit).expanduser() if explicit else cache_home() / "content-hashes.json"


def _named(value: str, seen: set[Path]) -> Iterator[Path]:
    text = _MODEL_SPEC.sub("", value, count=1)
    if text.strip() in ("", "."):  # "" is Path("."): an empty setting must not hash the working directory
        return
    path = Path(text)
    try:
        if not path.exists() or path.resolve() in seen:
            return
        seen.add(path.resolve())
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: not a path, then
        return
    yield path
    if path.suffix in (".yaml", ".yml") and path.is_file():
        for text in _yaml_texts(path):
            yield from _named(text, seen)


def _yaml_texts(path: Path) -> Iterator[str]:
    """The text values of a YAML file, except under keys that name outputs; nothing if it does not parse."""
    import yaml

    from synth import safe_yaml
    from synth.errors import DistillError

    try:
        data = safe_yaml.load(path.read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, DistillError, RecursionError):
        return  # the stage reading it says what is wrong; its bytes are hashed all the same

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, child in node.items():
                if key not in NOT_INPUTS:
                    yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)
        elif isinstance(node, str):
            yield node

    yield from walk(data)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _kept_digests() -> dict[str, dict[str, Any]]:
    global _kept
    if _kept is None:
        try:
            data = json.loads(kept_digests_path().read_text(encoding="utf-8"))
            _kept = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _kept = {}
    return _kept


def _save_kept(kept: dict[str, dict[str, Any]]) -> None:
    """Write the kept digests (the newest `_KEPT_MAX`); a cache that cannot be written is only slower."""
    from synth.layout import write_text_atomic

    while len(kept) > _KEPT_MAX:
        kept.pop(next(iter(kept)))
    try:
        target = kept_digests_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, json.dumps(kept))
    except OSError:
        pass

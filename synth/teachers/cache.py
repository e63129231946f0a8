"""Every teacher response, committed to SQLite the moment it arrives.

One row per *sample*: the key hashes (teacher identity, messages, sampling
parameters except `n`, sample index). Asking for more samples later reuses the
first ones; changing only how responses are parsed reuses all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from synth.paths import cache_home
from synth.teachers.base import ChatRequest, Completion

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    completion TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    created REAL NOT NULL
)
"""


def default_cache_dir() -> Path:
    """$BBD_RESPONSE_CACHE, else <cache home>/responses."""
    explicit = os.environ.get("BBD_RESPONSE_CACHE")
    return Path(explicit).expanduser() if explicit else cache_home() / "responses"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_fingerprint(identity: dict[str, Any], request: ChatRequest) -> str:
    """Hash of what decides a sample, except its index: the key prefix of a request."""
    payload = {
        "teacher": identity,
        "messages": [m.model_dump() for m in request.messages],
        "params": request.params.cache_fields(),
    }
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def sample_key(fingerprint: str, index: int) -> str:
    """The cache key of sample `index` of a request."""
    return f"{fingerprint}:{index}"


class ResponseCache:
    """A SQLite store of samples, safe for many tasks in one process and many processes on one file."""

    def __init__(self, directory: str | Path | None = None, *, read: bool = True, write: bool = True):
        self.read = read
        self.write = write
        self.path = Path(directory or default_cache_dir()) / "responses.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: the event loop thread and worker threads may both use it.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        # WAL lets readers and one writer work at once across processes; synchronous=NORMAL
        # still survives a killed process (only an OS crash can lose the last commits).
        _switch_to_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=60000")
        self._db.execute(SCHEMA)

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[Completion, int]]:
        """The cached samples among `keys`, as key → (completion, prompt tokens)."""
        if not self.read or not keys:
            return {}
        found: dict[str, tuple[Completion, int]] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, completion, prompt_tokens FROM samples WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, completion, prompt_tokens in rows:
                    found[key] = (Completion.model_validate_json(completion), prompt_tokens)
        return found

    def put_many(self, teacher: str, items: Iterable[tuple[str, Completion, int]]) -> None:
        """Commit samples (key, completion, prompt tokens) in one transaction, replacing older ones."""
        if not self.write:
            return
        now = time.time()
        rows = [(key, teacher, c.model_dump_json(exclude_defaults=True), pt, now) for key, c, pt in items]
        if not rows:
            return
        with self._lock:
            if len(rows) == 1:  # the usual case: one statement is its own transaction
                self._db.execute("INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?)", rows[0])
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO samples (key, teacher, completion, prompt_tokens, created) VALUES (?,?,?,?,?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def present(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` the cache holds (nothing when it is not read)."""
        if not self.read or not keys:
            return set()
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                found.update(row[0] for row in self._db.execute(f"SELECT key FROM samples WHERE key IN ({marks})", chunk))
        return found

    def count(self) -> int:
        """Number of samples stored."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def _switch_to_wal(db: sqlite3.Connection, patience: float = 60.0) -> None:
    """Turn on WAL, waiting while another process does the same: SQLite answers that switch
    with "database is locked" at once, without calling the busy handler."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)

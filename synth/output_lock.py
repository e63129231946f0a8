"""One writer per output: an OS file lock beside it (`out.jsonl.lock`), held while a command writes there.

Two processes on one output would share its journal: the second rewrites it and the first
ends with the other's lines and loses its own. The lock makes the second stop at once. It
is an flock(2): the OS drops it when its holder exits, even by `kill -9`, so a stale lock
file never blocks anyone. Within one process the lock is reentrant (a command holds its
output's, and the jobs inside it their stage outputs', in any nesting).
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from synth.errors import DistillError


class OutputBusy(DistillError):
    """Another process is writing the same output."""


_held: dict[str, list[int]] = {}  # lock file → [descriptor, how many holders in this process]
_guard = threading.Lock()


def lock_path(output: str | Path) -> Path:
    """The lock file of an output: `out.jsonl` → `out.jsonl.lock`."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


@contextmanager
def writing(output: str | Path) -> Iterator[None]:
    """Hold `output`'s lock for the block; OutputBusy at once if another process holds it."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(Path(output), path), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(path, entry[0])


def _acquire(output: Path, path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(
                f"{output}: another process (pid {holder}) is writing this output; wait for it to finish or stop it "
                "(an interrupted run resumes where it stopped), or choose another --output"
            ) from None
        # Its last holder may have removed the file between our open and our lock: lock the file now there.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    # Removed while still locked, so no one can lock the old file after we let go (see _acquire).
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)

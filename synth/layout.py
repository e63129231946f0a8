"""Where a job's files go and how they are written: every path rule and atomic write in one place.

An output `out.jsonl` has beside it `out.rejects.jsonl`, the journal `out.jsonl.partial`
(and its `.recover` copy while it is repaired), a multi-stage command's stage files in
`out.work/`, and other record kinds or reports as `out.KIND.jsonl`, `out.coverage.*`,
`out.tree.yaml`. Outputs appear whole: written to a temp file, then renamed.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from pydantic import BaseModel

from synth.errors import ConfigError

#: What commands write beside an output `out.jsonl`, as suffixes of `out` (see `side_paths`).
SIDE_SUFFIXES = (".rejects.jsonl", ".work", ".sft.jsonl", ".pairs.jsonl", ".coverage.json", ".coverage.md", ".tree.yaml")
#: Work files that are never part of a published dataset: journals, stage folders, the writer's lock.
WORK_SUFFIXES = (".partial", ".recover", ".work", ".lock")


def stem(output: str | Path) -> str:
    """The output's name without `.jsonl`: `out.jsonl` → `out`."""
    name = Path(output).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def rejects_path(output: str | Path) -> Path:
    """Where the rejects of `output` go: `out.jsonl` → `out.rejects.jsonl`."""
    output = Path(output)
    return output.with_name(stem(output) + ".rejects.jsonl")


def journal_path(output: str | Path) -> Path:
    """The journal behind `output`: `out.jsonl` → `out.jsonl.partial`."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def job_files(output: str | Path) -> list[Path]:
    """Every file a job writes for `output`: the output, its rejects, its journal and the journal's recovery copy."""
    journal = journal_path(output)
    return [Path(output), rejects_path(output), journal, journal.with_name(journal.name + ".recover")]


def check_output(output: str | Path, inputs: Iterable[str | Path] = (), also: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an output the job must not write; `also` are other files it writes beside it.

    Refused: `-` (no stdout), a directory or special file (device, pipe) at any path written, a
    path that is one of `inputs`, and an existing output or rejects file that is not ours: a
    non-empty file whose first line is not a record or reject this toolkit writes.
    """
    output = Path(output)
    if str(output) == "-":
        raise ConfigError("output '-': writing to standard output is not supported; give a file path")
    if output.parent.exists() and not output.parent.is_dir():
        raise ConfigError(f"{output}: {output.parent} is not a directory")
    written = [*job_files(output), *map(Path, also)]
    for path in written:
        _check_writable(path)
    for source in map(Path, inputs):
        clash = next((w for w in written if _same_file(source, w)), None)
        if clash is not None:
            what = "the output" if clash == output else f"the file {clash}"
            raise ConfigError(f"{source}: the input is also {what} that this job writes; choose another output")
    for path in (output, rejects_path(output)):
        if path.is_file() and not _ours(path):
            raise ConfigError(
                f"{path}: exists and is not an output of distill (its first line is not one of its records or rejects); "
                "move it away or choose another output"
            )


def _check_writable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be written ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path}: is a directory; give a file path")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: is not a regular file (a device, pipe or socket); give a file path")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


#: The first line of a file we may replace is read up to this many bytes (a record with soft labels is long).
_FIRST_LINE_LIMIT = 1 << 24


def _ours(path: Path) -> bool:
    """True for an empty file, or one whose first line is a record (`kind` and `id`) or a reject (`task` and `reason`)."""
    with path.open("rb") as fh:
        line = b""
        while not line.strip():
            line = fh.readline(_FIRST_LINE_LIMIT)
            if not line:
                return True
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and ({"kind", "id"} <= obj.keys() or {"task", "reason"} <= obj.keys())


def stage_dir(output: str | Path) -> Path:
    """Where a multi-stage command keeps its stage files: `out.jsonl` → `out.work/`."""
    output = Path(output)
    return output.with_name(stem(output) + ".work")


def stage_output(output: str | Path, stage: str) -> Path:
    """Where a multi-stage command keeps stage `stage`'s records: `out.jsonl` → `out.work/stage.jsonl`."""
    return stage_dir(output) / f"{stage}.jsonl"


def sibling(output: str | Path, kind: str) -> Path:
    """A file beside the output for another record kind: `out.jsonl` → `out.KIND.jsonl`."""
    output = Path(output)
    return output.with_name(f"{stem(output)}.{kind}.jsonl")


def side_paths(output: str | Path) -> list[Path]:
    """Every path a command may write for `output`: the output, its journal, and the files beside it."""
    output = Path(output)
    return [output, journal_path(output), *(output.with_name(stem(output) + s) for s in SIDE_SUFFIXES)]


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[TextIO]:
    """A text file handle whose content replaces `path` only when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any] | BaseModel]) -> int:
    """Write rows to `path` through a temp file and a rename; returns the row count."""
    count = 0
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write(_line(row))
            count += 1
    return count


def _line(row: dict[str, Any] | BaseModel) -> str:
    if isinstance(row, BaseModel):
        return row.model_dump_json(exclude_none=True) + "\n"
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file and a rename, so a reader never sees half of it."""
    with atomic_writer(path) as fh:
        fh.write(text)
    return Path(path)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a file this toolkit wrote (a stage's records or rejects); a missing or empty file is no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

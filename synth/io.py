"""JSON Lines in (errors name file:line and field) and crash-safe, resumable output.

Output goes first to a journal beside the target (`out.jsonl.partial`), one line
per finished task holding its records and rejects. A crash can cut at most the
last line, which resume drops. When every task is done the journal is split into
`out.jsonl` and `out.rejects.jsonl`, each written to a temp file and renamed, so
the outputs a user sees are always whole. The journal's first line names the job
that wrote it, so a leftover journal of another job is never merged into this one.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ValidationError

from synth.errors import ConfigError, DistillError, InputError, describe_validation_error
from synth.records import RECORD_TYPES, Reject


#: The deepest nesting of arrays and objects a line may have; real data needs a handful of levels.
MAX_DEPTH = 100
# A JSON escape of a UTF-16 surrogate: a lone one decodes to a str that is not text (it cannot be encoded).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INNERMOST_PAIR = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")


def read_jsonl(path: str | Path, schema: type[BaseModel] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line number, object) for each non-blank line; validated into `schema` when given.

    Raises InputError naming `file:line` and the field at the first bad line, for an empty file,
    and for a path that is not a regular file (a directory, a pipe, or `-` for standard input:
    inputs are read twice, once to validate them all before the first request, so a stream will not do).
    """
    path = Path(path)
    _check_input_file(path)
    seen = False
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a BOM from Windows editors is harmless
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
            if not text.strip():
                continue
            seen = True
            obj = parse_json_line(text, f"{path}:{lineno}")
            if schema is not None:
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                try:
                    obj = schema.model_validate(obj)
                except ValidationError as exc:
                    raise InputError(f"{path}:{lineno}: {describe_validation_error(exc)}") from None
            yield lineno, obj
    if not seen:
        raise InputError(f"{path}: file is empty (no JSON lines)")


def _check_input_file(path: Path) -> None:
    if str(path) == "-":
        raise InputError("--input -: reading standard input is not supported (every line is validated before the first "
                         "request, then read again); save it to a file first")  # fmt: skip
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, not a JSON Lines file")
    if not stat.S_ISREG(mode):
        # Never opened: a pipe would block until a writer came, and could not be read twice.
        raise InputError(f"{path}: is not a regular file (a pipe, socket or device); save the lines to a file first")


def parse_json_line(text: str, where: str) -> Any:
    """One JSON value of a JSON Lines file; an InputError naming `where` for anything no later step could handle.

    Refused besides invalid JSON: nesting deeper than MAX_DEPTH, integers too long for Python
    to convert, and strings holding a lone UTF-16 surrogate (a `\\ud800` escape), which no
    teacher request or tokenizer can encode.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # Python's guard against converting huge integers
        raise InputError(f"{where}: a number with more than {sys.get_int_max_str_digits()} digits (Python will not convert it)") from None
    # The checks below walk the text only when a line could fail them: the cost stays off ordinary lines.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise InputError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):
        field = _surrogate_field(obj)
        if field is not None:
            raise InputError(f"{where}: field '{field}': holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), "
                             "which is not text; fix the export that wrote it")  # fmt: skip
    return obj


def _depth(text: str) -> int:
    """How deeply the arrays and objects of valid JSON `text` nest, up to MAX_DEPTH + 1."""
    skeleton = _JSON_STRING.sub("", text)  # brackets inside strings are text
    depth = 0
    while depth <= MAX_DEPTH:
        skeleton, removed = _INNERMOST_PAIR.subn("", skeleton)
        if not removed:
            break
        depth += 1
    return depth


def _surrogate_field(obj: Any) -> str | None:
    """The dotted path (as pydantic names fields: `messages.0.content`) of the first string or key holding a lone surrogate."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where or "(the line)"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):  # reversed onto the stack: the first field comes off first
                name = f"{where}.{key}" if where else key
                if _SURROGATE.search(key):
                    return name.encode("utf-8", "backslashreplace").decode()
                stack.append((item, name))
        elif isinstance(value, list):
            stack.extend((item, f"{where}.{i}" if where else str(i)) for i, item in reversed(list(enumerate(value))))
    return None


def rejects_path(output: str | Path) -> Path:
    """Where the rejects of `output` go: `out.jsonl` → `out.rejects.jsonl`."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".rejects.jsonl")


#: What to do with a journal this job cannot use.
RESTART_HINT = "add --restart to discard it (answers already received stay cached and cost nothing)"


class JournalError(DistillError):
    """A journal or output that cannot be used, read or written; the message names the file and what to do."""


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


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any] | BaseModel]) -> int:
    """Write rows to `path` through a temp file and a rename; returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(_line(row))
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def _line(row: dict[str, Any] | BaseModel) -> str:
    if isinstance(row, BaseModel):
        return row.model_dump_json(exclude_none=True) + "\n"
    return json.dumps(row, ensure_ascii=False) + "\n"


class TaskJournal:
    """The resumable record of finished tasks behind one output file.

    Its first line names the job (`job`: a fingerprint of the teacher and every request);
    a journal another job left is refused, never merged.
    """

    def __init__(self, output: str | Path, job: str | None = None):
        self.output = Path(output)
        self.path = journal_path(self.output)
        self.job = job
        self.done: set[str] = set()
        self._fh = None

    def open(self, restart: bool = False) -> set[str]:
        """Open for appending, after recovering from any crash; returns the ids of finished tasks.

        A cut last line is dropped, and so are tasks that ended in a teacher error: nothing
        was paid for them, so a rerun tries them again. `restart` discards the journal first.
        Raises JournalError for another job's journal or a damaged one.
        """
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if restart:
            self.path.unlink(missing_ok=True)
        if self.path.exists():
            self._recover()
        fresh = not self.path.exists()
        self._fh = self.path.open("a", encoding="utf-8")
        if fresh:
            self._fh.write(json.dumps({"journal": 1, "job": self.job}) + "\n")
            self._fh.flush()
        return set(self.done)

    def _recover(self) -> None:
        """Keep the whole lines of this job's journal; refuse another job's or a damaged one."""
        kept = self.path.with_name(self.path.name + ".recover")
        try:
            with self.path.open("rb") as src, kept.open("wb") as dst:
                for lineno, raw in enumerate(src, start=1):
                    if not raw.endswith(b"\n"):
                        if lineno == 1 and not b'{"journal":'.startswith(raw[:11]):
                            raise self._damaged(lineno, "not a journal header")
                        break  # the line a crash cut short
                    entry = self._entry(raw, lineno)
                    if lineno == 1:
                        self._check_header(entry)
                    elif entry.get("retry"):
                        continue
                    else:
                        self.done.add(entry["task"])
                    dst.write(raw)
                dst.flush()
                os.fsync(dst.fileno())
        except BaseException:
            kept.unlink(missing_ok=True)
            raise
        if kept.stat().st_size:
            os.replace(kept, self.path)
        else:  # only a cut header: start afresh
            kept.unlink()
            self.path.unlink()

    def _entry(self, raw: bytes, lineno: int) -> dict[str, Any]:
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            raise self._damaged(lineno, "not JSON") from None
        if not isinstance(entry, dict):
            raise self._damaged(lineno, "not a JSON object")
        if lineno > 1 and not (
            isinstance(entry.get("task"), str) and isinstance(entry.get("records"), list) and isinstance(entry.get("rejects"), list)
        ):
            raise self._damaged(lineno, "no task, records and rejects")
        return entry

    def _check_header(self, entry: dict[str, Any]) -> None:
        if "journal" not in entry:
            raise JournalError(f"{self.path}: a journal without a job fingerprint (left by an older version); {RESTART_HINT}")
        if entry.get("job") != self.job:
            raise JournalError(
                f"{self.path}: left by an interrupted run of another job (other input, teacher or settings); "
                f"rerun that command to finish it, or {RESTART_HINT}"
            )

    def _damaged(self, lineno: int, why: str) -> JournalError:
        return JournalError(f"{self.path}:{lineno}: damaged journal ({why}); {RESTART_HINT}")

    def add(self, task: str, records: list[BaseModel], rejects: list[Reject]) -> bool:
        """Append one finished task as a single line, flushed to the OS; True when it failed and a rerun retries it."""
        retry = bool(rejects) and not records and all(r.error for r in rejects)
        # Serialised by pydantic directly: this runs once per task on the hot path.
        line = '{"task":%s,"retry":%s,"records":[%s],"rejects":[%s]}\n' % (
            json.dumps(task),
            "true" if retry else "false",
            ",".join(r.model_dump_json(exclude_none=True) for r in records),
            ",".join(r.model_dump_json(exclude_none=True) for r in rejects),
        )
        self._fh.write(line)
        self._fh.flush()
        self.done.add(task)
        return retry

    def finalize(self) -> tuple[int, int]:
        """Split the journal into the output and rejects files and remove it; returns their counts."""
        self._fh.close()
        counts = [0, 0]

        def pick(field: str, slot: int) -> Iterator[dict[str, Any]]:
            with self.path.open(encoding="utf-8") as fh:
                next(fh, None)  # the header
                for raw in fh:
                    for row in json.loads(raw)[field]:
                        counts[slot] += 1
                        yield row

        write_jsonl_atomic(self.output, pick("records", 0))
        write_jsonl_atomic(rejects_path(self.output), pick("rejects", 1))
        self.path.unlink()
        return counts[0], counts[1]

    def close(self) -> None:
        """Close without finalizing: the journal stays for the next run to resume."""
        if self._fh is not None and not self._fh.closed:
            try:
                self._fh.close()
            except OSError:
                pass  # a write error already reported; the next run drops the line it cut


def load_records(path: str | Path) -> Iterator[BaseModel]:
    """Read records written by a generator, each into its model by its `kind`."""
    for lineno, obj in read_jsonl(path):
        yield _record_of(obj, path, lineno)


def _record_of(obj: Any, path: str | Path, lineno: int) -> BaseModel:
    kind = obj.get("kind", "sft") if isinstance(obj, dict) else None
    model = RECORD_TYPES.get(kind)
    if model is None:
        raise InputError(f"{path}:{lineno}: field 'kind': unknown record kind {kind!r}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"{path}:{lineno}: {describe_validation_error(exc)}") from None


def to_hf_dataset(path: str | Path):
    """A `datasets.Dataset` in TRL's columns (`messages`; `prompt`/`completion`; `prompt`/`chosen`/`rejected`).

    Lines are our records, or plain TRL rows (no `kind`, no `provenance`: data made elsewhere).
    """
    from datasets import Dataset

    rows = []
    shape = None
    for lineno, obj in read_jsonl(path):
        plain = plain_trl_row(obj, f"{path}:{lineno}")
        if plain is not None:
            row, rid = plain, str(obj.get("id", f"line-{lineno}"))
        else:
            record = _record_of(obj, path, lineno)
            row, rid = record.to_trl(), record.id
        if shape is None:
            shape, first = set(row), _forms(row)
        elif set(row) != shape:
            raise InputError(f"{path}:{lineno}: mixes record formats {sorted(shape)} and {sorted(row)}; split them first")
        elif _forms(row) != first:
            raise InputError(f"{path}:{lineno}: mixes text and chat messages in one column ({_forms(row)}; earlier lines: {first})")
        rows.append({"id": rid, **row})
    return Dataset.from_list(rows)


def _forms(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {'text' if isinstance(v, str) else 'chat'}" for k, v in sorted(row.items()))


# TRL's dataset shapes, most specific first.
_TRL_SHAPES = (("prompt", "chosen", "rejected"), ("prompt", "completion"), ("messages",))


def plain_trl_row(obj: Any, where: str) -> dict[str, Any] | None:
    """The TRL columns of a plain row (text or chat messages), or None when the line is one of our records."""
    if not isinstance(obj, dict) or "kind" in obj or "provenance" in obj:
        return None
    shape = next((s for s in _TRL_SHAPES if all(k in obj for k in s)), None)
    if shape is None:
        got = ", ".join(sorted(obj)) or "none"
        raise InputError(f"{where}: neither a distill record (no 'kind'/'provenance') nor a TRL row: expected the fields "
                         f"messages, prompt + completion, or prompt + chosen + rejected (got {got})")  # fmt: skip
    for key in shape:
        value = obj[key]
        chat = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
        if not (isinstance(value, str) and value.strip()) and not chat:
            raise InputError(f"{where}: field '{key}': expected text or a list of {{role, content}} messages")
    return {k: obj[k] for k in shape}

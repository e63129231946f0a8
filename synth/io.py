"""JSON Lines in: every line checked (errors name file:line and field), records read by kind, TRL datasets.

Where outputs go and how they are written is `synth/layout.py`; the resumable journal is `synth/journal.py`.
"""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ValidationError

from synth.errors import InputError, describe_validation_error
from synth.records import RECORD_TYPES


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

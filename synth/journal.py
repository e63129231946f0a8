"""The resumable record of a job's finished tasks, beside its output.

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
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from synth.errors import DistillError
from synth.layout import journal_path, rejects_path, write_jsonl_atomic
from synth.records import Reject

#: What to do with a journal this job cannot use.
RESTART_HINT = "add --restart to discard it (answers already received stay cached and cost nothing)"


class JournalError(DistillError):
    """A journal or output that cannot be used, read or written; the message names the file and what to do."""


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
                f"{self.path}: left by an interrupted run of another job (other input, teacher, settings or parsing code); "
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

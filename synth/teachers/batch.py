"""The openai backend through the provider's Batch API: one upload, one batch, one download for many requests.

`batch: true` in a teacher file builds this teacher instead of `OpenAITeacher`. It asks for the
same things (the request bodies are the online backend's own, from `OpenAITeacher._build`), parses
the same answers (`OpenAITeacher._convert`) and has the same cache identity, so the per-sample
response cache cannot tell where an answer came from: a job can start in batch mode and finish
online, or the reverse, and nothing is paid twice.

How a `generate` call goes (the runner hands it every pending request at once: `batch_size` is
unbounded and `concurrency` 1):

1. Each request becomes a line whose `custom_id` is content-addressed (the request's cache
   fingerprint, its first sample and sample count), so the same work always has the same id.
2. Earlier runs' batches that hold any of these lines and were never collected (the state file,
   below) are re-attached: polled to their end and downloaded. Nothing in them is sent again.
3. The rest is split to the provider's limits (`batch_max_requests`, `batch_max_bytes`), sorted
   so the same pending set always makes the same files, and each part becomes a batch. Before
   anything is uploaded, its fingerprint (a hash of the teacher and the exact bytes of its lines)
   and its lines are recorded; the batch carries the fingerprint in its `metadata`, and its id is
   recorded as soon as `create` returns. A process killed between `create` and that record finds
   the batch again by listing batches and matching the metadata.
4. Batches are polled every `batch_poll_interval` seconds; their output and error files are read
   and each answer is returned to the caller (the cached teacher commits it to the cache).
   Lines that failed (429, 5xx) or expired, and lines of a batch that failed, go into a new batch,
   or online with `batch_fallback: online`, at most `batch_max_attempts` batches per line; a 400 is
   a reject at once. A batch someone cancelled (`distill batch cancel`) is not resubmitted by the
   run that saw it end: its unanswered lines are rejects, and a rerun asks for them again.
5. A batch is marked collected once what it answered is in the cache (at the next `generate` call
   or at `aclose`); until then a rerun re-attaches to it and downloads it again, for nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai

from synth.redact import redact
from synth.teachers.base import (
    Capabilities,
    ChatRequest,
    ChatResponse,
    Completion,
    PermanentTeacherError,
    Prices,
    Teacher,
    TeacherError,
    TransientTeacherError,
    Usage,
)
from synth.teachers.cache import default_cache_dir, request_fingerprint
from synth.teachers.config import TeacherSettings
from synth.teachers.openai_api import (
    _CONTEXT_WORDS,
    _REASONING_PARAMS,
    _REFUSAL_FIX,
    OpenAITeacher,
    map_error,
)
from synth.teachers.retry import call_with_retries, error_for_status

T = TypeVar("T")

#: The only endpoint these batches call.
ENDPOINT = "/v1/chat/completions"
#: Where a batch's life ends; of these only `completed` answered every line it could.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: The metadata key carrying a batch's tag (its lines' fingerprint and sequence number).
METADATA_KEY = "bbd_batch"
#: Tests only: `kill_after_create` SIGKILLs this process right after a batch is created, before its id is recorded.
HOOK_ENV = "BBD_BATCH_TEST_HOOK"
#: Seconds between two lines saying how far a batch in progress got (every change of status is said at once).
PROGRESS_EVERY = 300.0
#: How far back (seconds before an unrecorded batch's upload began) listing batches looks for it.
_LIST_SLACK = 3600.0

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS batches (
        tag TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        seq INTEGER NOT NULL,
        teacher TEXT NOT NULL,
        spec TEXT NOT NULL,
        requests INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        input_file_id TEXT,
        batch_id TEXT,
        status TEXT NOT NULL,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        collected INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        updated REAL NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS batch_lines (tag TEXT NOT NULL, custom_id TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS batch_lines_custom_id ON batch_lines (custom_id)",
    "CREATE INDEX IF NOT EXISTS batch_lines_tag ON batch_lines (tag)",
)


def batch_prices(config: TeacherSettings) -> Prices:
    """The teacher file's prices times `batch_discount` (OpenAI bills batches at half price)."""
    scale = config.batch_discount
    return Prices(*(None if p is None else p * scale for p in (config.price_per_mtok_in, config.price_per_mtok_out)))


def state_path(config: TeacherSettings) -> Path:
    """The file that records submitted batches: `batch_state_dir`, else beside the response cache."""
    base = Path(config.batch_state_dir).expanduser() if config.batch_state_dir else default_cache_dir()
    return base / "batches.sqlite"


def teacher_key(identity: dict[str, Any]) -> str:
    """A teacher's cache identity as the text the state file stores."""
    return json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


class BatchState:
    """The batches this machine submitted, and the request lines of each (SQLite, safe across processes)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=60, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA busy_timeout=60000")
        for statement in SCHEMA:
            self._db.execute(statement)

    def begin(self, fingerprint: str, teacher: str, spec: str, custom_ids: Sequence[str], size: int) -> str:
        """Record a batch about to be uploaded and created (no id yet); its tag, `FINGERPRINT.SEQ`."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (seq,) = self._db.execute("SELECT COUNT(*) FROM batches WHERE fingerprint = ?", (fingerprint,)).fetchone()
                tag = f"{fingerprint}.{seq}"
                self._db.execute(
                    "INSERT INTO batches (tag, fingerprint, seq, teacher, spec, requests, bytes, status, created, updated) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (tag, fingerprint, seq, teacher, spec, len(custom_ids), size, "uploading", now, now),
                )
                self._db.executemany("INSERT INTO batch_lines VALUES (?, ?)", [(tag, c) for c in custom_ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return tag

    def update(self, tag: str, **values: Any) -> None:
        """Set some columns of a batch's row."""
        values["updated"] = time.time()
        names = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            self._db.execute(f"UPDATE batches SET {names} WHERE tag = ?", (*values.values(), tag))

    def forget(self, tag: str) -> None:
        """Drop a row whose batch was never created."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM batch_lines WHERE tag = ?", (tag,))
            self._db.execute("DELETE FROM batches WHERE tag = ?", (tag,))
            self._db.execute("COMMIT")

    def collect(self, tags: Sequence[str]) -> None:
        """Mark batches whose answers are all in the cache: no later run re-attaches to them."""
        if not tags:
            return
        with self._lock:
            self._db.executemany("UPDATE batches SET collected = 1, updated = ? WHERE tag = ?", [(time.time(), t) for t in tags])

    def outstanding(self, teacher: str, custom_ids: Sequence[str]) -> list[sqlite3.Row]:
        """Batches of this teacher not collected yet that hold any of these lines, oldest first."""
        tags: set[str] = set()
        with self._lock:
            for start in range(0, len(custom_ids), 500):
                chunk = list(custom_ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    "SELECT DISTINCT l.tag FROM batch_lines l JOIN batches b ON b.tag = l.tag "
                    f"WHERE b.collected = 0 AND b.teacher = ? AND l.custom_id IN ({marks})",
                    (teacher, *chunk),
                )
                tags.update(r[0] for r in rows)
            if not tags:
                return []
            marks = ",".join("?" * len(tags))
            return self._db.execute(f"SELECT * FROM batches WHERE tag IN ({marks}) ORDER BY created", tuple(tags)).fetchall()

    def lines(self, tag: str) -> list[str]:
        """The custom ids of a batch's lines."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT custom_id FROM batch_lines WHERE tag = ?", (tag,))]

    def rows(self, teacher: str | None = None, *, collected: bool = False) -> list[sqlite3.Row]:
        """Every batch recorded (of one teacher; collected ones too when asked), oldest first."""
        where, args = [], []
        if teacher is not None:
            where.append("teacher = ?")
            args.append(teacher)
        if not collected:
            where.append("collected = 0")
        sql = "SELECT * FROM batches" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created"
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


class NotRetriedHere(TransientTeacherError):
    """A line this run does not ask again (its batch was cancelled, or cannot be reached now); a rerun does."""


@dataclass(eq=False)
class _Line:
    """One line of a batch file: `request.params.n` samples from `request.sample_offset` on."""

    custom_id: str
    request: ChatRequest
    #: (request index in the generate call, position of this line's first sample in that request's samples)
    owners: list[tuple[int, int]] = field(default_factory=list)
    #: Batches this line went through in this call.
    tries: int = 0


@dataclass(eq=False)
class _Job:
    """A batch being waited for: its tag, id, and the lines of this call it answers."""

    tag: str
    batch_id: str
    lines: dict[str, _Line]
    #: Whether every line the batch holds is one of this call's (then it is collected once this call returns).
    whole: bool = True
    #: Set once the batch ended and its files were read.
    collected: bool = False


class BatchTeacher(Teacher):
    """An OpenAI-compatible teacher whose requests go through `/v1/files` and `/v1/batches`."""

    backend = "openai"
    #: Everything pending in one call: the batch is the unit, and the runner's window must not cut it up.
    batch_size = 1 << 40
    concurrency = 1

    def __init__(self, config: TeacherSettings):
        super().__init__(config.model)
        self.config = config
        #: The online teacher: request bodies, parsing, identity, the client, and the fallback.
        self.online = OpenAITeacher(config.model_copy(update={"batch": False}))
        self.online.stats = self.stats
        self.json_mode = "json_schema" if config.structured_output == "auto" else config.structured_output
        #: Whether the server honours `n` (None: not seen yet); when it does not, missing samples get lines of their own.
        self.n_supported: bool | None = None
        self._identity = self.online.cache_identity()
        self._key = teacher_key(self._identity)
        self._state: BatchState | None = None
        #: Batches whose answers were returned by the last call: collected at the next call or at aclose.
        self._returned: list[str] = []

    def __repr__(self) -> str:
        return f"BatchTeacher(model={self.model!r}, base_url={self.online.base_url!r})"

    @property
    def tokenizer_name(self) -> str | None:
        """The tokenizer the teacher file names, if any."""
        return self.online.tokenizer_name

    def cache_identity(self) -> dict[str, Any]:
        """The online teacher's: a batch answer and an online answer to the same request are the same sample."""
        return self._identity

    @property
    def spec(self) -> str:
        """The online teacher's name: records and cache rows say the same whichever way they were asked."""
        return self.online.spec

    @property
    def state(self) -> BatchState:
        """The state file, opened on first use."""
        if self._state is None:
            self._state = BatchState(state_path(self.config))
        return self._state

    # -- the protocol -----------------------------------------------------------------------------

    async def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Answer every request through batches (re-attaching to earlier runs' first); failures come back in the list."""
        self._collect_returned()  # what the last call returned has been committed by the cached teacher
        if not requests:
            return []
        lines = self._plan(requests)
        slots: list[list[Completion | None]] = [[None] * r.params.n for r in requests]
        usage = [Usage() for _ in requests]
        final: dict[int, TeacherError] = {}
        jobs: list[_Job] = []

        todo = list(lines.values())
        # Earlier runs' batches are waited for while the lines none of them holds go out in new ones.
        attached = await self._reattach(todo)
        jobs.extend(attached)
        held = {cid for job in attached for cid in job.lines}
        fresh = [line for line in todo if line.custom_id not in held]
        earlier, new = await asyncio.gather(self._wait_all(attached), self._send(fresh, jobs) if fresh else _nothing())
        answers = {**earlier, **new}
        while True:
            todo = self._settle(todo, answers, slots, usage, final)
            if not todo:
                break
            failed = [line for line in todo if line.tries]
            answers = {}
            if failed and self.config.batch_fallback == "online":
                say(f"{len(failed)} requests that failed in a batch go online (full price)")
                for line in failed:
                    line.tries = self.config.batch_max_attempts - 1  # online retries its own; what fails there is final
                replies = await self.online.generate([line.request for line in failed])
                answers.update((line.custom_id, reply) for line, reply in zip(failed, replies))
            batched = [line for line in todo if line.custom_id not in answers]
            if batched:
                answers.update(await self._send(batched, jobs))

        self._returned.extend(job.tag for job in jobs if job.collected and job.whole)
        out: list[ChatResponse | TeacherError] = []
        for ri, samples in enumerate(slots):
            if ri in final:
                out.append(final[ri])
                continue
            assert all(c is not None for c in samples), "every sample of an answered request is filled"
            out.append(ChatResponse(completions=list(samples), usage=usage[ri], model=self.model, cached=[False] * len(samples)))
        return out

    async def capabilities(self) -> Capabilities:
        """Probed online: a batch takes minutes to hours to say the same."""
        return await self.online.capabilities()

    async def aclose(self) -> None:
        """Mark what was returned as collected, close the state file and the HTTP client."""
        self._collect_returned()
        if self._state is not None:
            self._state.close()
            self._state = None
        await self.online.aclose()

    # -- planning and settling lines ---------------------------------------------------------------

    def _plan(self, requests: Sequence[ChatRequest]) -> dict[str, _Line]:
        """One line per request (per sample, once the server is known to ignore `n`), the same work sharing one line."""
        lines: dict[str, _Line] = {}
        for ri, req in enumerate(requests):
            n = req.params.n
            parts = [(k, 1) for k in range(n)] if n > 1 and self.n_supported is False else [(0, n)]
            for pos, count in parts:
                self._add_line(lines, req, ri, pos, count, 0)
        return lines

    def _add_line(self, lines: dict[str, _Line], req: ChatRequest, ri: int, pos: int, count: int, base: int) -> _Line:
        """The line for samples `pos .. pos+count` of `req` (whose first sample is sample `base` of request `ri`)."""
        sub = req
        if pos or count != req.params.n:
            params = req.params.model_copy(update={"n": count})
            sub = req.model_copy(update={"params": params, "sample_offset": req.sample_offset + pos})
        cid = f"{request_fingerprint(self._identity, sub)[:40]}-{sub.sample_offset}-{count}"
        line = lines.setdefault(cid, _Line(cid, sub))
        line.owners.append((ri, base + pos))
        return line

    def _settle(
        self,
        todo: list[_Line],
        answers: dict[str, ChatResponse | TeacherError],
        slots: list[list[Completion | None]],
        usage: list[Usage],
        final: dict[int, TeacherError],
    ) -> list[_Line]:
        """Fill in what came back; the lines still to ask (never sent, worth another batch, or missing samples)."""
        again: list[_Line] = []
        extra: dict[str, _Line] = {}
        for line in todo:
            got = answers.get(line.custom_id)
            if got is None:
                again.append(line)
                continue
            if isinstance(got, TeacherError):
                line.tries += 1
                if got.retryable and not isinstance(got, NotRetriedHere) and line.tries < self.config.batch_max_attempts:
                    again.append(line)
                else:
                    for ri, _ in line.owners:
                        final.setdefault(ri, got)
                continue
            want = line.request.params.n
            have = got.completions[:want]
            for ri, first in line.owners:
                for i, completion in enumerate(have):
                    slots[ri][first + i] = completion
                u = usage[ri]
                usage[ri] = Usage(
                    prompt_tokens=u.prompt_tokens + got.usage.prompt_tokens,
                    completion_tokens=u.completion_tokens + got.usage.completion_tokens,
                    reasoning_tokens=u.reasoning_tokens + got.usage.reasoning_tokens,
                )
            if len(have) < want:
                if self.n_supported is not False:
                    self.n_supported = False
                    say(f"the server returned {len(have)} of n={want} choices; missing samples get lines of their own, each with its seed")
                for ri, first in line.owners:
                    for k in range(len(have), want):
                        self._add_line(extra, line.request, ri, k, 1, first)
        return again + list(extra.values())

    # -- batches -----------------------------------------------------------------------------------

    def _client(self) -> openai.AsyncOpenAI:
        self.online._ensure_client()
        return self.online.pool.endpoints[0].client

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One API call, transient failures retried as the online backend retries (max_retries, backoff)."""

        async def once() -> T:
            try:
                return await fn()
            except (openai.OpenAIError, ValueError) as exc:
                raise map_error(exc) from None

        return await call_with_retries(once, self.online.policy, self.stats)

    def _line_bytes(self, line: _Line) -> bytes:
        req = line.request
        mode = self.json_mode if req.params.json_schema is not None else None
        body = self.online._build(req.messages, req.params, req.params.n, req.sample_seed(req.sample_offset), mode)
        row = {"custom_id": line.custom_id, "method": "POST", "url": ENDPOINT, "body": body}
        return json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    async def _reattach(self, todo: list[_Line]) -> list[_Job]:
        """The batches earlier runs submitted for any of these lines and never collected (found by metadata if need be)."""
        by_id = {line.custom_id: line for line in todo}
        found: list[_Job] = []
        for row in self.state.outstanding(self._key, list(by_id)):
            batch_id = row["batch_id"]
            if batch_id is None:
                batch = await self._find(row["tag"], row["created"])
                if batch is None:  # stopped before `create` went through: nothing to find, nothing paid
                    self.state.forget(row["tag"])
                    continue
                batch_id = batch.id
                self.state.update(row["tag"], batch_id=batch_id, status=batch.status)
                say(f"found {batch_id} by its metadata (created just before an earlier run stopped, its id not yet recorded): re-attached")
            else:
                ago = _ago(row["created"])
                say(f"re-attached to {batch_id} ({row['requests']} requests, submitted {ago}, last seen {row['status']})")
            ids = self.state.lines(row["tag"])
            mine = {cid: by_id[cid] for cid in ids if cid in by_id}
            found.append(_Job(row["tag"], batch_id, mine, whole=len(mine) == len(ids)))
            self.stats.requests_sent += len(mine)
        return found

    async def _wait_all(self, jobs: list[_Job]) -> dict[str, ChatResponse | TeacherError]:
        """Every job's answers, an answer winning over an error where two batches hold the same line."""
        return _merge(await asyncio.gather(*(self._finish(job) for job in jobs)))

    async def _send(self, lines: list[_Line], jobs: list[_Job]) -> dict[str, ChatResponse | TeacherError]:
        """Submit these lines as batches within the provider's limits, wait for them all, and read their answers."""
        answers: dict[str, ChatResponse | TeacherError] = {}
        chunks: list[list[tuple[_Line, bytes]]] = [[]]
        size = 0
        for line in sorted(lines, key=lambda x: x.custom_id):
            data = self._line_bytes(line)
            if len(data) > self.config.batch_max_bytes:
                answers[line.custom_id] = PermanentTeacherError(
                    f"request too large for one batch file ({len(data):,} bytes, batch_max_bytes {self.config.batch_max_bytes:,})"
                )
                continue
            if chunks[-1] and (len(chunks[-1]) >= self.config.batch_max_requests or size + len(data) > self.config.batch_max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((line, data))
            size += len(data)
        started: list[_Job] = []
        for chunk in chunks:
            if not chunk:
                continue
            try:
                started.append(await self._submit(chunk))
            except TeacherError as err:
                answers.update((line.custom_id, err) for line, _ in chunk)
        jobs.extend(started)
        answers.update(await self._wait_all(started))
        return answers

    async def _submit(self, chunk: list[tuple[_Line, bytes]]) -> _Job:
        """Record, upload and create one batch; its id is recorded the moment `create` returns."""
        data = b"".join(d for _, d in chunk)
        fingerprint = hashlib.sha256(self._key.encode() + b"\n" + data).hexdigest()[:32]
        lines = {line.custom_id: line for line, _ in chunk}
        tag = self.state.begin(fingerprint, self._key, redact(self.spec), list(lines), len(data))
        began = time.time()
        client = self._client()
        try:
            upload = await self._call(lambda: client.files.create(file=("requests.jsonl", data, "application/jsonl"), purpose="batch"))
        except TeacherError:
            self.state.forget(tag)
            raise
        self.state.update(tag, input_file_id=upload.id, status="creating")
        metadata = {METADATA_KEY: tag, "bbd_requests": str(len(lines))}

        async def create() -> Any:
            try:
                return await client.batches.create(
                    input_file_id=upload.id, endpoint=ENDPOINT, completion_window=self.config.batch_completion_window, metadata=metadata
                )
            except (openai.APITimeoutError, openai.APIConnectionError):
                # It may have been created all the same: look before asking again, or it would be paid twice.
                existing = await self._find(tag, began, retry=False)
                if existing is not None:
                    return existing
                raise

        try:
            batch = await self._call(create)
        except TeacherError as err:
            if not err.retryable:  # refused (a bad file, a bad key): no batch exists
                self.state.forget(tag)
                raise
            try:
                batch = await self._find(tag, began)
            except TeacherError:
                # Whether it exists is unknown: the row stays, and a rerun finds out before asking again.
                raise NotRetriedHere(f"creating a batch failed ({err.reason}); rerun to re-attach to it or submit it") from None
            if batch is None:
                self.state.forget(tag)
                raise
        _test_hook("kill_after_create")
        self.state.update(tag, batch_id=batch.id, status=batch.status)
        self.stats.requests_sent += len(lines)
        say(
            f"submitted {batch.id}: {len(lines)} requests ({len(data) / 1e6:.1f} MB), window {self.config.batch_completion_window}; "
            "if this run stops, the same command re-attaches to it (see distill batch status)"
        )
        return _Job(tag, batch.id, lines)

    async def _find(self, tag: str, since: float, *, retry: bool = True) -> Any | None:
        """The batch carrying `tag` in its metadata, by listing batches (newest first) back to shortly before `since`."""
        client = self._client()

        async def search() -> Any | None:
            try:
                async for batch in client.batches.list(limit=100):
                    if (batch.metadata or {}).get(METADATA_KEY) == tag:
                        return batch
                    if batch.created_at and batch.created_at < since - _LIST_SLACK:
                        return None
            except (openai.OpenAIError, ValueError) as exc:
                raise map_error(exc) from None
            return None

        return await (call_with_retries(search, self.online.policy, self.stats) if retry else search())

    async def _finish(self, job: _Job) -> dict[str, ChatResponse | TeacherError]:
        """Poll a batch to its end, then read its output and error files: an answer or an error for each of its lines."""
        client = self._client()
        last, said, polls = None, 0.0, 0
        while True:
            polls += 1
            try:
                batch = await self._call(lambda: client.batches.retrieve(job.batch_id))
            except TeacherError as err:
                if err.status == 404:  # the provider has no such batch (any more): ask again
                    job.collected = True
                    gone = TransientTeacherError(f"batch {job.batch_id} not found at the provider: {err.reason}")
                    return {cid: gone for cid in job.lines}
                later = NotRetriedHere(f"batch {job.batch_id} cannot be reached ({err.reason}); rerun to re-attach to it")
                return {cid: later for cid in job.lines}
            counts = batch.request_counts
            done = f"{counts.completed}/{counts.total} answered, {counts.failed} failed" if counts else ""
            self.state.update(job.tag, status=batch.status, **({"completed": counts.completed, "failed": counts.failed} if counts else {}))
            # Every change of status; progress within one at most every PROGRESS_EVERY seconds (a batch may take a day).
            if last is None or batch.status != last[0] or (done != last[1] and time.monotonic() - said >= PROGRESS_EVERY):
                say(f"{job.batch_id} {batch.status}" + (f": {done}" if done else ""))
                last, said = (batch.status, done), time.monotonic()
            if batch.status in TERMINAL:
                break
            await asyncio.sleep(self.config.batch_poll_interval)

        answers: dict[str, ChatResponse | TeacherError] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            try:
                content = await self._call(lambda fid=file_id: client.files.content(fid))
            except TeacherError as err:
                later = NotRetriedHere(f"batch {job.batch_id}: cannot download {file_id} ({err.reason}); rerun to re-attach to it")
                return {cid: answers.get(cid, later) for cid in job.lines}
            for raw in content.content.splitlines():
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                line = job.lines.get(row.get("custom_id")) if isinstance(row, dict) else None
                if line is not None:
                    answers[line.custom_id] = self._result(row, line)
        missing = _why_missing(batch)
        for cid in job.lines:
            answers.setdefault(cid, missing)
        if polls == 1 and batch.status == "cancelled":
            # Cancelled before this run looked (a rerun after `distill batch cancel`): the rerun is the user asking again.
            for cid, answer in answers.items():
                if isinstance(answer, NotRetriedHere):
                    answers[cid] = TransientTeacherError(answer.message.replace("; rerun to ask again", "").replace(" (rerun to ask again)", ""))
        job.collected = True
        ok = sum(1 for a in answers.values() if not isinstance(a, TeacherError))
        self.stats.requests_ok += ok
        self.stats.errors += len(answers) - ok
        errors = [a for a in answers.values() if isinstance(a, TeacherError)]
        if errors:
            say(f"{job.batch_id} {batch.status}: {ok} of {len(answers)} answered; {len(errors)} not ({errors[0].reason})")
        return answers

    def _result(self, row: dict, line: _Line) -> ChatResponse | TeacherError:
        """One line of an output or error file as an answer or an error."""
        response, error = row.get("response"), row.get("error")
        if isinstance(response, dict) and response.get("status_code") == 200:
            try:
                reply = self.online._convert(response.get("body"), line.request.params)
            except TeacherError as err:
                return err
            self.stats.prompt_tokens += reply.usage.prompt_tokens
            self.stats.completion_tokens += reply.usage.completion_tokens
            self.stats.reasoning_tokens += reply.usage.reasoning_tokens
            return reply
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            status = response["status_code"]
            body = response.get("body")
            detail = body.get("error") if isinstance(body, dict) else None
            detail = detail if isinstance(detail, dict) else {}
            message = redact(" ".join(str(detail.get("message") or body or "error").split())[:500])
            param, code = str(detail.get("param") or ""), str(detail.get("code") or "")
            if status == 400 and param in _REASONING_PARAMS and code in ("unsupported_parameter", "unsupported_value"):
                if param not in self.online.refused:
                    self.online.refused.add(param)
                    say(f"the model refuses {param!r} ({message[:120]}); {_REFUSAL_FIX[param]}")
                return TransientTeacherError(f"refused {param}; sent again without it", status=status)
            if status in (400, 413, 422) and any(w in (code + " " + message).lower() for w in _CONTEXT_WORDS):
                return PermanentTeacherError("prompt too long for the model's context: " + message, status=status)
            return error_for_status(status, message)
        if isinstance(error, dict):
            code = str(error.get("code") or "error")
            message = redact(" ".join(str(error.get("message") or "").split())[:300])
            if code == "batch_cancelled":
                return NotRetriedHere(f"{code}: {message} (rerun to ask again)")
            return TransientTeacherError(f"{code}: {message}")
        return TransientTeacherError("malformed line in the batch's output")

    def _collect_returned(self) -> None:
        if self._returned:
            self.state.collect(self._returned)
            self._returned = []

    # -- for `distill batch status` and `distill batch cancel` -------------------------------------

    async def report(self, *, collected: bool = False) -> list[dict[str, Any]]:
        """This teacher's recorded batches (not yet collected, unless `collected`), each as the provider sees it now."""
        client = self._client()
        out = []
        for row in self.state.rows(self._key, collected=collected):
            item = {
                "batch_id": row["batch_id"], "tag": row["tag"], "requests": row["requests"], "status": row["status"],
                "completed": row["completed"], "failed": row["failed"], "created": row["created"], "collected": bool(row["collected"]),
            }  # fmt: skip
            try:
                batch = await self._call(lambda bid=row["batch_id"]: client.batches.retrieve(bid)) if row["batch_id"] else None
                if batch is None and not row["collected"]:
                    batch = await self._find(row["tag"], row["created"])
                    if batch is not None:
                        self.state.update(row["tag"], batch_id=batch.id)
                        item["batch_id"] = batch.id
            except TeacherError as err:
                item["error"] = err.reason
                batch = None
            if batch is not None:
                counts = batch.request_counts
                item["status"] = batch.status
                if counts:
                    item.update(completed=counts.completed, failed=counts.failed)
                    self.state.update(row["tag"], status=batch.status, completed=counts.completed, failed=counts.failed)
            elif row["batch_id"] is None and "error" not in item:
                item["status"] = "never created"
            out.append(item)
        return out

    async def cancel(self, batch_id: str | None = None) -> list[tuple[str, str]]:
        """Cancel this teacher's batches still running (or the one named): (id, status after) for each."""
        client = self._client()
        done = []
        for item in await self.report():
            if item["batch_id"] is None or item["status"] in TERMINAL or item["status"] == "cancelling":
                continue
            if batch_id is not None and item["batch_id"] != batch_id:
                continue
            batch = await self._call(lambda bid=item["batch_id"]: client.batches.cancel(bid))
            self.state.update(item["tag"], status=batch.status)
            done.append((batch.id, batch.status))
        return done


def say(text: str) -> None:
    """A line on stderr about the batches (they take long: a user wants to know where they stand)."""
    print(f"batch: {redact(text)}", file=sys.stderr, flush=True)


def _why_missing(batch: Any) -> TeacherError:
    """The error of a line the batch's files do not answer, from how the batch ended."""
    if batch.status == "cancelled":
        return NotRetriedHere(f"batch {batch.id} was cancelled before answering it; rerun to ask again")
    if batch.status == "expired":
        return TransientTeacherError(f"batch {batch.id} expired before answering it")
    if batch.status == "failed":
        errors = getattr(batch.errors, "data", None) or []
        why = "; ".join(f"{e.code}: {e.message}" for e in errors[:3] if e is not None) or "no reason given"
        return TransientTeacherError(redact(f"batch {batch.id} failed: {why}"))
    return TransientTeacherError(f"batch {batch.id} {batch.status} without an answer to it")


def _merge(results: Sequence[dict[str, ChatResponse | TeacherError]]) -> dict[str, ChatResponse | TeacherError]:
    """Several batches' answers to the same lines: an answer wins over an error."""
    merged: dict[str, ChatResponse | TeacherError] = {}
    for result in results:
        for cid, answer in result.items():
            if cid not in merged or isinstance(merged[cid], TeacherError):
                merged[cid] = answer
    return merged


async def _nothing() -> dict[str, ChatResponse | TeacherError]:
    return {}


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _test_hook(point: str) -> None:
    """Tests: die here, as a `kill -9` would, when BBD_BATCH_TEST_HOOK names this point."""
    if os.environ.get(HOOK_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)

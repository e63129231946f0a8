"""Runs one generator over an input file: validate everything, then run, journal and finalize."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Union

from pydantic import BaseModel

from synth.teachers.cache import ResponseCache
from synth.errors import ConfigError, DistillError, DryRun
from synth.estimate import Estimate
from synth.generators.base import Generator, ReasoningMode
from synth.io import read_jsonl
from synth.journal import JournalError, TaskJournal
from synth.layout import check_output, rejects_path
from synth.output_lock import writing
from synth.progress import JobCounts, ProgressLine
from synth.runner import Runner
from synth.teachers import TeacherSettings, build_teacher
from synth.teachers.base import Teacher
from synth.teachers.budget import Budget
from synth.teachers.cached import CachedTeacher

CacheMode = Literal["use", "refresh", "off"]


class BudgetStop(DistillError):
    """Requests were held back so as not to pass --budget-usd; what was answered is written and cached."""


def _budget_message(budget: Budget, not_sent: int, output: Path | None) -> str:
    written = f"what was answered is in {output} and its rejects" if output is not None else "nothing was answered"
    return (
        f"stopped on budget: ${budget.spent:.4f} of ${budget.limit:g} spent, {not_sent} requests not sent (rejects with reason "
        f"'budget'); {written}; rerun with a larger --budget-usd to send the rest (answers received are cached and cost nothing)"
    )


class TeacherUnavailable(DistillError):
    """Every request failed: nothing was produced, and the journal is kept for a rerun."""


@dataclass
class JobSummary:
    """What a finished job produced and what it cost."""

    output: Path
    rejects: Path
    tasks: int
    resumed: int
    records: int
    rejected: int
    requests_sent: int
    cache_hits: int
    retries: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    teacher_errors: int = 0
    duplicates: int = 0
    #: Of completion_tokens, those a reasoning model spent thinking.
    reasoning_tokens: int = 0
    #: What the tokens sent cost, from the teacher's prices (None without them).
    cost: float | None = None


def parser_code(generator: Generator) -> str:
    """A hash of the source of every module the generator's class and its bases live in (ours, not pydantic's).

    Part of the job's identity: a journal half-written by another version of the parsing code is
    not resumed into this one (its answers are still cached, so a restart pays nothing for them).
    """
    digest = hashlib.sha256()
    for cls in type(generator).__mro__:
        module = sys.modules.get(cls.__module__)
        source = getattr(module, "__file__", None)
        if source and cls.__module__.split(".")[0] == "synth":
            digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


def open_cache(cache_dir: str | Path | None, mode: CacheMode) -> ResponseCache:
    """The response cache for a mode: use (read+write), refresh (write only) or off."""
    return ResponseCache(cache_dir, read=mode == "use", write=mode != "off")


@contextmanager
def _disk_errors(path: Path, doing: str, cache: ResponseCache) -> Iterator[None]:
    """An OSError (disk full, permissions) as one line naming the file and the error, and saying what is kept."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        kept = "every answer received is cached" if cache.write else "nothing was cached (--no-cache)"
        raise JournalError(
            f"{where}: {doing}: {exc.strerror or exc}; {kept}: fix that and rerun the same command to continue"
        ) from None


@contextmanager
def _stop_on_signals(runner: Runner) -> Iterator[None]:
    """First Ctrl-C or SIGTERM: stop starting requests and wait for those in flight, so none
    that the teacher answers (and bills) is lost; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    loop, main = asyncio.get_running_loop(), asyncio.current_task()

    def handle() -> None:
        if runner.stopping:
            main.cancel()
            return
        runner.stop()
        print("stopping: waiting for the requests in flight (already paid for); interrupt again to abort", file=sys.stderr, flush=True)

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, handle)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


@dataclass
class RunSettings:
    """How a job talks to the cache and the terminal; the same for every command."""

    cache_dir: str | Path | None = None
    cache_mode: CacheMode = "use"
    progress: bool = True
    #: Discard the journal an earlier run left (cached answers are still used).
    restart: bool = False
    #: What SFT records do with a reasoning teacher's thinking (see synth.generators.base.ReasoningMode).
    reasoning: ReasoningMode = "keep"
    #: The most the command may spend (USD), over all its stages and teachers; None: no cap.
    budget_usd: float | None = None
    #: Print the estimate and send nothing (a pipeline: its first stage's).
    dry_run: bool = False


#: Each command's spending tracker, by its RunSettings (kept alive here, so an id is never reused).
_budgets: dict[int, tuple[RunSettings, Budget]] = {}


def budget_of(settings: RunSettings) -> Budget | None:
    """The spending tracker shared by every job run with these settings (a pipeline's stages, label's teachers)."""
    if settings.budget_usd is None:
        return None
    if id(settings) not in _budgets:
        _budgets[id(settings)] = (settings, Budget(settings.budget_usd))
    return _budgets[id(settings)][1]


#: A job's inputs: a JSON Lines file (validated against the generator's input model), or a
#: function returning (where, item) pairs afresh each call (the job iterates twice).
Source = Union[str, Path, Callable[[], Iterable[tuple[str, BaseModel]]]]


def run_job(
    make_generator: Callable[[Teacher], Generator],
    source: Source,
    output: str | Path,
    teacher: Teacher | TeacherSettings,
    settings: RunSettings | None = None,
    *,
    limit: int | None = None,
    label: str = "generate",
) -> JobSummary:
    """Validate every input, then run every task not yet done and write output and rejects.

    Given a config the job builds its teacher and closes it; given a teacher, the caller
    owns it (several stages can then share one loaded model).
    """
    settings = settings or RunSettings()
    output = Path(output)
    check_output(output, [source] if isinstance(source, (str, Path)) else [])
    owned = isinstance(teacher, TeacherSettings)
    if owned:
        teacher = build_teacher(teacher)
    generator = make_generator(teacher)
    generator.reasoning = settings.reasoning

    def items() -> Iterator[tuple[str, BaseModel]]:
        if isinstance(source, (str, Path)):
            rows = ((f"{source}:{lineno}", item) for lineno, item in read_jsonl(source, generator.input_model))
        else:
            rows = iter(source())
        return islice(rows, limit)

    # A bad line, or a template that does not fit one, fails the job before any teacher call or output.
    # The job is what it asks of whom: every task's id and request, then the teacher (below).
    total, job = 0, hashlib.sha256(f"{type(generator).__qualname__}:{settings.reasoning}:{parser_code(generator)}".encode())
    estimate, identity = Estimate(), teacher.cache_identity()
    for where, item in items():
        task = generator.make_task(item, where)
        job.update(task.id.encode() + task.request.model_dump_json().encode())
        estimate.add(identity, task.request)
        total += 1

    budget = budget_of(settings)
    if budget is not None and teacher.prices.cost(1, 1) is None:
        raise ConfigError(f"--budget-usd needs the teacher's prices: set price_per_mtok_in and price_per_mtok_out in its file ({teacher.spec})")
    refused_before = budget.refused if budget is not None else 0
    cache = open_cache(settings.cache_dir, settings.cache_mode)
    if settings.progress or settings.dry_run:
        estimate.settle(cache.present(estimate.all_keys()))
        print(estimate.line(label, teacher.prices), file=sys.stderr, flush=True)
    if settings.dry_run:
        cache.close()
        raise DryRun(f"dry run: nothing was sent ({label}{'; later stages depend on its answers' if not isinstance(source, (str, Path)) else ''})")
    cached = CachedTeacher(teacher, cache, budget)
    stats_before = replace(teacher.stats)
    job.update(json.dumps(cached.cache_identity(), sort_keys=True, default=str).encode())
    journal = TaskJournal(output, job.hexdigest()[:24])
    counts = JobCounts(total=total)
    started = time.monotonic()
    runner = Runner(cached, journal, counts)
    held = ExitStack()
    try:
        held.enter_context(writing(output))  # before the journal is touched: one writer per output
        with _disk_errors(journal.path, "cannot open the journal", cache):
            recovered = journal.open(settings.restart)

        async def main() -> None:
            try:
                with _stop_on_signals(runner):
                    async with ProgressLine(label, cached, counts, enabled=settings.progress):
                        tasks = (generator.make_task(item, where) for where, item in items())
                        await runner.run(tasks, generator.outcome)
            finally:
                if owned:
                    await cached.aclose()

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None  # interrupted twice: aborted
        except sqlite3.Error as exc:
            raise JournalError(f"{cache.path}: cannot store the responses: {exc}") from None
        if runner.write_error is not None:
            with _disk_errors(journal.path, "cannot write the journal", cache):
                raise runner.write_error
        if runner.stopping:
            raise KeyboardInterrupt  # the journal holds every finished task; the CLI says how to resume
        not_sent = budget.refused - refused_before if budget is not None else 0
        if counts.failed and counts.failed == counts.done and not counts.skipped:
            if not recovered:
                # The journal holds failures only (a rerun retries them anyway): leave no partial file behind.
                journal.close()
                journal.path.unlink(missing_ok=True)
            if not_sent:
                raise BudgetStop(_budget_message(budget, not_sent, None))
            raise TeacherUnavailable(
                f"every request to {teacher.spec} failed ({counts.first_error}); nothing was written, rerun to retry"
            )
        with _disk_errors(output, "cannot write the output", cache):
            records, rejected = journal.finalize()
        if not_sent:
            raise BudgetStop(_budget_message(budget, not_sent, output))
    finally:
        journal.close()
        cache.close()
        held.close()
    s = teacher.stats
    return JobSummary(
        output=output,
        rejects=rejects_path(output),
        tasks=total,
        resumed=counts.skipped,
        records=records,
        rejected=rejected,
        requests_sent=s.requests_sent - stats_before.requests_sent,
        cache_hits=cached.cache_stats.hits,
        retries=s.retries - stats_before.retries,
        prompt_tokens=s.prompt_tokens - stats_before.prompt_tokens,
        completion_tokens=s.completion_tokens - stats_before.completion_tokens,
        reasoning_tokens=s.reasoning_tokens - stats_before.reasoning_tokens,
        cost=teacher.prices.cost(s.prompt_tokens - stats_before.prompt_tokens, s.completion_tokens - stats_before.completion_tokens),
        seconds=time.monotonic() - started,
        teacher_errors=counts.failed,
        duplicates=counts.duplicates,
    )

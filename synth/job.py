"""Runs one generator over an input file: validate everything, then run, journal and finalize."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Literal

from synth.cache import ResponseCache
from synth.errors import ConfigError, DistillError
from synth.generators.base import Generator, Task
from synth.io import TaskJournal, read_jsonl, rejects_path
from synth.progress import JobCounts, ProgressLine
from synth.runner import Runner
from synth.teachers import TeacherConfig, build_teacher
from synth.teachers.base import Teacher
from synth.teachers.cached import CachedTeacher

CacheMode = Literal["use", "refresh", "off"]


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


def open_cache(cache_dir: str | Path | None, mode: CacheMode) -> ResponseCache:
    """The response cache for a mode: use (read+write), refresh (write only) or off."""
    return ResponseCache(cache_dir, read=mode == "use", write=mode != "off")


def run_job(
    make_generator: Callable[[Teacher], Generator],
    input_path: str | Path,
    output: str | Path,
    teacher_config: TeacherConfig,
    *,
    cache_dir: str | Path | None = None,
    cache_mode: CacheMode = "use",
    limit: int | None = None,
    progress: bool = True,
    label: str = "generate",
) -> JobSummary:
    """Validate the whole input, then run every task not yet done and write output and rejects."""
    input_path, output = Path(input_path), Path(output)
    if output.resolve() == input_path.resolve():
        raise ConfigError(f"{output}: the output would overwrite the input")
    teacher = build_teacher(teacher_config)
    generator = make_generator(teacher)

    def tasks() -> Iterator[Task]:
        rows = read_jsonl(input_path, generator.input_model)
        for lineno, item in islice(rows, limit):
            yield generator.make_task(item, f"{input_path}:{lineno}")

    # A bad line or a template that does not fit it fails the job before any teacher call or output file.
    total = 0
    for lineno, item in islice(read_jsonl(input_path, generator.input_model), limit):
        generator.messages(item, f"{input_path}:{lineno}")
        total += 1

    cache = open_cache(cache_dir, cache_mode)
    cached = CachedTeacher(teacher, cache)
    journal = TaskJournal(output)
    counts = JobCounts(total=total)
    started = time.monotonic()
    prices = (teacher_config.price_per_mtok_in, teacher_config.price_per_mtok_out)
    journal.open()
    teacher_errors = 0
    try:

        async def main() -> None:
            try:
                async with ProgressLine(label, cached, counts, enabled=progress, prices=prices):
                    await Runner(cached, journal, counts).run(tasks(), generator.parse)
            finally:
                await cached.aclose()

        asyncio.run(main())
        teacher_errors = counts.failed
        if teacher_errors and teacher_errors == counts.done and not counts.skipped:
            raise TeacherUnavailable(
                f"every request to {teacher.spec} failed ({counts.first_error}); nothing was written, rerun to retry"
            )
        records, rejected = journal.finalize()
    finally:
        journal.close()
        cache.close()
    s = teacher.stats
    return JobSummary(
        output=output,
        rejects=rejects_path(output),
        tasks=total,
        resumed=counts.skipped,
        records=records,
        rejected=rejected,
        requests_sent=s.requests_sent,
        cache_hits=cached.cache_stats.hits,
        retries=s.retries,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        seconds=time.monotonic() - started,
        teacher_errors=teacher_errors,
    )

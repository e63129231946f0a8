"""The live progress line: tasks, requests/s, tokens, cache hits, retries, rejects, cost."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, fields, replace

from rich.console import Console
from rich.live import Live
from rich.text import Text

from synth.teachers.base import TeacherStats


@dataclass
class JobCounts:
    """What a job has done so far."""

    total: int | None = None
    done: int = 0
    skipped: int = 0
    #: Inputs that repeat an earlier line's task: done once, counted here.
    duplicates: int = 0
    records: int = 0
    rejects: int = 0
    failed: int = 0
    first_error: str = ""


def log_interval() -> float:
    """Seconds between progress lines in a log: $BBD_PROGRESS_SECONDS, default 30."""
    try:
        value = float(os.environ.get("BBD_PROGRESS_SECONDS", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


class ProgressLine:
    """Redraws one status line on a terminal; in a log, writes one every `log_every` seconds and at each 10 % of the tasks."""

    def __init__(self, label: str, teacher, counts: JobCounts, *, enabled: bool = True, log_every: float | None = None):
        self.label = label
        self.teacher = teacher
        self.counts = counts
        self.enabled = enabled
        self.log_every = log_every if log_every is not None else log_interval()
        self.console = Console(stderr=True, soft_wrap=True)
        self.start = time.monotonic()
        # A teacher serves every stage of a pipeline: this line counts this job's share only.
        self.before = replace(teacher.stats)
        self.hits_before = teacher.cache_stats.hits
        self._task: asyncio.Task | None = None

    def stats(self) -> TeacherStats:
        """The teacher's counters since this job started."""
        now, then = self.teacher.stats, self.before
        return TeacherStats(**{f.name: getattr(now, f.name) - getattr(then, f.name) for f in fields(TeacherStats)})

    def render(self) -> str:
        """The status line as text."""
        c, s = self.counts, self.stats()
        elapsed = max(time.monotonic() - self.start, 1e-9)
        total = f"/{c.total}" if c.total is not None else ""
        parts = [
            f"{self.label} {c.done + c.skipped + c.duplicates}{total} tasks",
            f"{s.requests_sent / elapsed:.1f} req/s",
            f"{s.prompt_tokens + s.completion_tokens:,} tok" + (f" ({s.reasoning_tokens:,} reasoning)" if s.reasoning_tokens else ""),
            f"cached {self.teacher.cache_stats.hits - self.hits_before}",
            f"retries {s.retries}",
            f"records {c.records}",
            f"rejects {c.rejects}",
        ]
        if c.skipped:
            parts.append(f"resumed {c.skipped}")
        if c.duplicates:
            parts.append(f"duplicates {c.duplicates}")
        cost = self.cost()
        if cost is not None:
            parts.append(f"${cost:.4f}")
        return " | ".join(parts)

    def cost(self) -> float | None:
        """Estimated spend of this job so far, when the teacher has prices."""
        s = self.stats()
        return self.teacher.prices.cost(s.prompt_tokens, s.completion_tokens)

    async def __aenter__(self) -> "ProgressLine":
        if self.enabled:
            self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.enabled:
            self.console.print(self.render(), highlight=False)

    async def _loop(self) -> None:
        if sys.stderr.isatty():
            with Live(Text(self.render()), console=self.console, transient=True, refresh_per_second=4) as live:
                while True:
                    await asyncio.sleep(0.25)
                    live.update(Text(self.render()))
        # In a log (not a terminal): a line every `log_every` seconds and at each tenth of the tasks.
        last, decile = time.monotonic(), 0
        while True:
            await asyncio.sleep(min(0.5, self.log_every))
            c = self.counts
            now_decile = 10 * (c.done + c.skipped + c.duplicates) // c.total if c.total else 0
            if now_decile > decile or time.monotonic() - last >= self.log_every:
                decile, last = max(decile, now_decile), time.monotonic()
                if now_decile < 10:  # the final line is printed on exit
                    self.console.print(self.render(), highlight=False)

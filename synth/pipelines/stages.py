"""Plumbing every multi-stage pipeline shares: teachers built once, one cached job per stage, rejects gathered.

A pipeline's stages each run as a cached, resumable job into `OUT.work/NAME.jsonl`
(`synth.layout.stage_output`); the pipeline then assembles the final records from them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.errors import InputError, describe_validation_error
from synth.generators.feedback.base import FeedbackInput, reason_category
from synth.io import read_jsonl
from synth.job import JobSummary, RunSettings, run_job
from synth.layout import read_rows, rejects_path, stage_dir, stage_output, write_jsonl_atomic
from synth.teachers import TeacherOverrides, TeacherSettings, build_teacher
from synth.teachers.base import Teacher

R = TypeVar("R", bound="StagedResult")

#: The settings every pipeline has beside its method's own: where it reads and writes, its teachers, its cache.
PIPELINE_FIELDS = frozenset({"input", "output", "limit", "teacher", "teacher_overrides", "run"})


class PipelineSettings(BaseModel):
    """What every pipeline's settings hold besides its own: teacher overrides and the cache, set by flags only."""

    model_config = ConfigDict(extra="forbid")

    teacher_overrides: TeacherOverrides = TeacherOverrides()
    run: RunSettings = Field(default_factory=RunSettings, description="Cache, progress and restart (the cache flags).")


class TeacherPool:
    """Builds each distinct teacher once, so stages that share a model share one loaded copy."""

    def __init__(self):
        self._built: dict[str, Teacher] = {}

    def get(self, config: TeacherSettings) -> Teacher:
        """The teacher for a config, built on first use."""
        key = config.model_dump_json()
        if key not in self._built:
            self._built[key] = build_teacher(config)
        return self._built[key]

    def close(self) -> None:
        """Release every teacher built."""
        for teacher in self._built.values():
            asyncio.run(teacher.aclose())
        self._built.clear()


@dataclass
class Stages:
    """The stages a pipeline ran: their summaries, and the rejects of all of them."""

    output: Path
    settings: RunSettings
    pool: TeacherPool
    summaries: list[tuple[str, JobSummary]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, make: Callable[[Teacher], Any], items: list[tuple[str, BaseModel]], config: TeacherSettings) -> list[dict[str, Any]]:
        """Run one cached job over `items` into `OUT.work/NAME.jsonl`; returns its records (its rejects are kept)."""
        if not items:
            return []
        out = stage_output(self.output, name)
        summary = run_job(make, lambda: iter(items), out, self.pool.get(config), self.settings, label=name)
        self.summaries.append((name, summary))
        self.rejects.extend(read_rows(summary.rejects))
        return read_rows(out)

    def finish(self, written: list[tuple[str, int, Path]], rejects: list[dict[str, Any]], result: type[R]) -> R:
        """Write every stage's rejects and the pipeline's own to `OUT.rejects.jsonl`; what was done, as a `result`."""
        all_rejects = [*self.rejects, *rejects]
        write_jsonl_atomic(rejects_path(self.output), all_rejects)
        return result(self.summaries, written, all_rejects, rejects_path(self.output), stage_dir(self.output))


@dataclass
class StagedResult:
    """What a multi-stage pipeline did: each stage's summary, each file written, every reject."""

    stages: list[tuple[str, JobSummary]]
    #: (what, how many, where) for each output file.
    written: list[tuple[str, int, Path]]
    rejects: list[dict[str, Any]]
    rejects_path: Path
    stage_dir: Path

    def reasons(self) -> list[tuple[str, int]]:
        """Reject counts by reason category, most frequent first."""
        return Counter(reason_category(r["reason"]) for r in self.rejects).most_common()

    @property
    def requests_sent(self) -> int:
        """Requests every stage sent to a teacher."""
        return sum(s.requests_sent for _, s in self.stages)

    @property
    def cache_hits(self) -> int:
        """Samples every stage took from the response cache."""
        return sum(s.cache_hits for _, s in self.stages)

    @property
    def teacher_errors(self) -> int:
        """Items that failed at a teacher in any stage (rerunning retries them)."""
        return sum(s.teacher_errors for _, s in self.stages)


def read_inputs(path: Path, limit: int | None, prompt_field: str = "prompt") -> list[tuple[str, FeedbackInput]]:
    """Every input line (validated before any work), up to `limit`; `prompt_field` names the prompt's field."""
    if prompt_field == "prompt":
        return [(f"{path}:{n}", item) for n, item in islice(read_jsonl(path, FeedbackInput), limit)]
    items = []
    for n, obj in islice(read_jsonl(path), limit):
        # Seed sets name their prompts otherwise (question, instruction): read them as they are, no copy to convert.
        if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str) or "prompt" in obj:
            raise InputError(f"{path}:{n}: field '{prompt_field}': expected a string (and no 'prompt' field beside it)")
        try:
            items.append((f"{path}:{n}", FeedbackInput.model_validate({**obj, "prompt": obj[prompt_field]})))
        except ValidationError as exc:
            raise InputError(f"{path}:{n}: {describe_validation_error(exc)}") from None
    return items

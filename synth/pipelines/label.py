"""Labeling with a vote: every teacher samples every input, then one vote over all their samples.

Two stages. Each teacher samples every input into its own cached, resumable job
(`OUT.work/samples-<i>.jsonl`); then a vote with no teacher reads all samples of each
input, in input order, and writes the SFT examples and the rejects, each atomically.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from synth.errors import ConfigError
from synth.filters.verify import get_checker, probe_checker
from synth.generators.base import ReasoningMode, with_reasoning
from synth.generators.label import LabelGenerator, LabelInput, LabelOptions, LabelSample, SampleGenerator, decide, reason_kind
from synth.io import read_jsonl
from synth.job import JobSummary, run_job
from synth.layout import check_output, read_rows, rejects_path, stage_output, write_jsonl_atomic
from synth.pipelines.stages import PipelineSettings
from synth.records import Reject
from synth.teachers import resolve_teacher


class LabelSettings(LabelOptions, PipelineSettings):
    """Settings of `distill label`: the labeling options, the files, the teachers and the cache."""

    input: Path = Field(description="JSON Lines with a question field.")
    output: Path = Field(description="JSON Lines of SFT examples; rejects go beside it.")
    limit: int | None = Field(None, ge=1, description="Only the first N inputs.")
    teacher: list[str] = Field(default_factory=lambda: ["embedded"], description="Teacher specs; several are voted across.")


@dataclass
class LabelResult:
    """What a labeling run wrote, rejects by kind, and each teacher's job summary (in --teacher order)."""

    output: Path
    rejects: Path
    kept: int
    reasons: Counter
    teachers: list[str]
    summaries: list[JobSummary]


def output_kind(settings: dict[str, Any]) -> str | None:
    """The kind of record the output holds (a recipe checks it against what a later stage reads): SFT examples, those the vote keeps."""
    return LabelGenerator.emits


def run(settings: LabelSettings) -> LabelResult:
    """Check everything, sample with every teacher, vote; reruns send nothing."""
    duplicated = [s for s, count in Counter(settings.teacher).items() if count > 1]
    if duplicated:
        raise ConfigError(f"--teacher {duplicated[0]} is given twice; raise -n for more samples instead")
    demonstrations = [settings.demonstrations] if isinstance(settings.demonstrations, Path) else []
    check_output(settings.output, [settings.input, *demonstrations])
    teachers = [resolve_teacher(spec, settings.teacher_overrides) for spec in settings.teacher]
    # Template, checker, demonstrations and every input line are checked before any teacher starts.
    order = task_order(SampleGenerator(settings, "check"), settings.input, settings.limit)

    stages, summaries = [], []
    for i, teacher in enumerate(teachers):
        stage = stage_output(settings.output, f"samples-{i}")
        summaries.append(
            run_job(
                lambda t: SampleGenerator(settings, t.spec, tokenizer=t.tokenizer_name),
                settings.input, stage, teacher, settings.run, limit=settings.limit,
                label=f"label {i + 1}/{len(teachers)}" if len(teachers) > 1 else "label",
            )
        )
        stages.append(stage)
    kept, reasons = vote(stages, order, settings.output, settings, settings.run.reasoning)
    return LabelResult(settings.output, rejects_path(settings.output), kept, reasons, list(settings.teacher), summaries)


def task_order(generator: SampleGenerator, source: Path, limit: int | None) -> list[str]:
    """The task id of each input, in input order, once each; every line's prompt is rendered as a check."""
    order: dict[str, None] = {}
    probe = None
    for lineno, item in islice(read_jsonl(source, LabelInput), limit):
        generator.messages(item, f"{source}:{lineno}")
        order.setdefault(generator.task_id(item), None)
        reference = generator.reference_of(item)
        if probe is None and reference is not None:
            probe = (reference, f"{source}:{lineno}'s reference answer")
    # The checker runs only when the answers are in: try it now, before any teacher is paid.
    probe_checker(generator.config.checker, *(probe or ("42", "a sample answer (no input has a reference)")))
    return list(order)


def vote(stages: list[Path], order: list[str], output: Path, options: LabelOptions, reasoning: ReasoningMode = "keep") -> tuple[int, Counter]:
    """Decide every input over all stages' samples; write output and rejects atomically.

    Returns the number of examples kept and the rejects counted by kind. Samples are
    read by offset, one input at a time, so memory holds one input's samples.
    """
    checker = get_checker(options.checker)
    indexes = [_index(stage) for stage in stages]
    # Teacher failures (nothing received) were rejects of the sampling jobs; they belong in the final rejects too.
    failures: dict[str, list[dict]] = defaultdict(list)
    for stage in stages:
        for row in read_rows(rejects_path(stage)):
            failures[row["task"]].append(row)

    def decisions() -> Iterator[tuple[list, list]]:
        handles = [stage.open("rb") for stage in stages]
        try:
            for task in order:
                samples = []
                for fh, index in zip(handles, indexes):
                    group = []
                    for offset in index.get(task, ()):
                        fh.seek(offset)
                        group.append(LabelSample.model_validate_json(fh.readline()))
                    samples.extend(sorted(group, key=lambda s: s.sample))
                decision = decide(samples, options, checker)
                yield [with_reasoning(r, reasoning) for r in decision.records], [*decision.rejects, *(Reject.model_validate(r) for r in failures.get(task, ()))]
        finally:
            for fh in handles:
                fh.close()

    reasons: Counter = Counter()

    def rejects() -> Iterator[Reject]:
        for _, rows in decisions():
            for r in rows:
                reasons[reason_kind(r)] += 1
                yield r

    # Rejects first: the output file appearing means the whole job is done.
    write_jsonl_atomic(rejects_path(output), rejects())
    kept = write_jsonl_atomic(output, (r for records, _ in decisions() for r in records))
    return kept, reasons


def _index(stage: Path) -> dict[str, list[int]]:
    """Byte offsets of each task's sample lines in a stage file."""
    index: dict[str, list[int]] = defaultdict(list)
    pos = 0
    with stage.open("rb") as fh:
        for line in fh:
            if line.strip():
                index[json.loads(line)["task"]].append(pos)
            pos += len(line)
    return index

"""`distill label`: chain-of-thought labels from one or more teachers, checked against references and voted on.

Two stages. Each teacher samples every input into its own cached, resumable job
(`OUT.work/samples-<i>.jsonl`); then a vote with no teacher reads all samples of each
input, in input order, and writes the SFT examples and the rejects, each atomically.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path
from typing import Iterator

from distill.commands.common import add_cache_flags, add_teacher_override_flags, limit_type, run_settings, teacher_config
from distill.config_flags import add_config_flags, load_config, model_flag_type
from synth.errors import ConfigError
from synth.filters.verify import get_checker, probe_checker
from synth.generators.label import (
    LabelConfig,
    LabelInput,
    LabelSample,
    SampleGenerator,
    decide,
    reason_kind,
)
from synth.io import read_jsonl
from synth.job import JobSummary, run_job
from synth.layout import read_rows, rejects_path, stage_output, write_jsonl_atomic
from synth.records import Reject
from synth.redact import redact
from synth.teachers import TeacherConfig


def register(sub) -> None:
    """Add the `label` command."""
    p = sub.add_parser(
        "label",
        help="label inputs with a teacher's chain-of-thought; verify and vote on the answers",
        description="Each input line has a question (and optionally a reference answer, e.g. GSM8K's '#### 72'). "
        "Every teacher answers each question n times; answers are extracted, checked against the reference "
        "and voted on across all teachers. Kept samples become prompt/completion SFT examples; the others go "
        "to the rejects file with their reason (truncated, no answer, wrong answer, minority answer). "
        "Responses are cached: a rerun sends no requests.",
    )
    p.add_argument("--input", required=True, type=Path, help="JSON Lines with a question field")
    p.add_argument("--output", required=True, type=Path, help="JSON Lines of SFT examples; rejects go beside it")
    p.add_argument("--limit", type=limit_type, help="only the first N inputs")
    add_config_flags(p, LabelConfig, title="labeling")
    # Shorthands and what the generic flags cannot express (a list of models, or a path).
    p.add_argument("-n", dest="n", type=model_flag_type(LabelConfig, "n"), default=argparse.SUPPRESS, help="samples per input and teacher (same as --n)")
    p.add_argument("--demonstrations", type=Path, default=argparse.SUPPRESS, metavar="FILE.jsonl",
                   help="worked examples ({question, answer} lines; GSM8K lines work) shown in the prompt")
    g = p.add_argument_group("teachers")
    g.add_argument("--teacher", action="append", metavar="SPEC",
                   help="embedded (default), hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL or a teacher .yaml; "
                   "repeat to sample from several teachers and vote across them")
    add_teacher_override_flags(g)
    add_cache_flags(p)
    p.set_defaults(func=run)


def teacher_configs(args: argparse.Namespace) -> list[TeacherConfig]:
    """One config per --teacher (default: embedded), each with the override flags applied."""
    specs = args.teacher or ["embedded"]
    duplicated = [s for s, count in Counter(specs).items() if count > 1]
    if duplicated:
        raise ConfigError(f"--teacher {duplicated[0]} is given twice; raise -n for more samples instead")
    return [teacher_config(argparse.Namespace(**{**vars(args), "teacher": spec})) for spec in specs]


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    config = load_config(args, LabelConfig)
    if args.output.resolve() == args.input.resolve():
        raise ConfigError(f"{args.output}: the output would overwrite the input")
    teachers = teacher_configs(args)
    settings = run_settings(args)
    # Template, checker, demonstrations and every input line are checked before any teacher starts.
    order = task_order(SampleGenerator(config, "check"), args.input, args.limit)

    stages, summaries = [], []
    for i, teacher in enumerate(teachers):
        stage = stage_output(args.output, f"samples-{i}")
        summaries.append(
            run_job(
                lambda t: SampleGenerator(config, t.spec, tokenizer=t.tokenizer_name),
                args.input, stage, teacher, settings, limit=args.limit,
                label=f"label {i + 1}/{len(teachers)}" if len(teachers) > 1 else "label",
            )
        )
        stages.append(stage)
    kept, reasons = vote(stages, order, args.output, config)
    print_label_summary(args.output, kept, reasons, args.teacher or ["embedded"], summaries)
    return 0


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


def vote(stages: list[Path], order: list[str], output: Path, config: LabelConfig) -> tuple[int, Counter]:
    """Decide every input over all stages' samples; write output and rejects atomically.

    Returns the number of examples kept and the rejects counted by kind. Samples are
    read by offset, one input at a time, so memory holds one input's samples.
    """
    checker = get_checker(config.checker)
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
                decision = decide(samples, config, checker)
                yield decision.records, [*decision.rejects, *(Reject.model_validate(r) for r in failures.get(task, ()))]
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


def print_label_summary(output: Path, kept: int, reasons: Counter, teachers: list[str], summaries: list[JobSummary]) -> None:
    """Where the examples and rejects went, rejects by kind, and what each teacher cost."""
    print(f"wrote {kept} labeled examples to {output}")
    detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    print(f"rejects: {sum(reasons.values())} in {rejects_path(output)}" + (f" ({detail})" if detail else ""))
    for name, s in zip(teachers, summaries):
        print(
            f"teacher {redact(name)}: {s.requests_sent} requests sent, {s.cache_hits} samples from cache, {s.retries} retries, "
            f"{s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion tokens in {s.seconds:.1f} s"
        )
    failed = sum(s.teacher_errors for s in summaries)
    if failed:
        print(f"warning: {failed} requests failed at a teacher (see the rejects); rerun the same command to retry them")

"""`distill label`: chain-of-thought labels from one or more teachers, checked against references and voted on.

The pipeline is `synth.pipelines.label`; this module declares its flags and prints what it did.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.commands.common import (
    add_cache_flags,
    add_teacher_override_flags,
    CACHE_KEYS,
    TEACHER_KEYS,
    Runnable,
    job_output,
    config_keys,
    limit_type,
    pipeline_settings,
    teacher_line,
)
from distill.config_flags import add_config_flags, model_flag_type
from synth.pipelines.label import LabelResult, LabelSettings, run as run_label
from synth.pipelines.stages import PIPELINE_FIELDS
from synth.redact import redact


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
    add_config_flags(p, LabelSettings, title="labeling", exclude=PIPELINE_FIELDS)
    # Shorthands and what the generic flags cannot express (a list of models, or a path).
    p.add_argument("-n", dest="n", type=model_flag_type(LabelSettings, "n"), default=argparse.SUPPRESS, help="samples per input and teacher (same as --n)")
    p.add_argument("--demonstrations", type=Path, default=argparse.SUPPRESS, metavar="FILE.jsonl",
                   help="worked examples ({question, answer} lines; GSM8K lines work) shown in the prompt")
    g = p.add_argument_group("teachers")
    g.add_argument("--teacher", action="append", default=argparse.SUPPRESS, metavar="SPEC",
                   help="embedded (default), hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL or a teacher .yaml; "
                   "repeat to sample from several teachers and vote across them")
    add_teacher_override_flags(g)
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> LabelSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    return pipeline_settings(values, LabelSettings)


def execute(settings: LabelSettings) -> int:
    """Run the pipeline and print what it did."""
    with job_output(settings.output, dict(settings)):
        print_result(run_label(settings))
        return 0



#: `distill label` as a recipe stage.
RUNNABLE = {"label": Runnable(config_keys(LabelSettings, PIPELINE_FIELDS) | TEACHER_KEYS | CACHE_KEYS | {"input", "output", "limit", "n", "demonstrations"},
                              settings_from, execute, repeated=frozenset({"teacher"}))}


def print_result(r: LabelResult) -> None:
    """Where the examples and rejects went, rejects by kind, and what each teacher cost."""
    print(f"wrote {r.kept} labeled examples to {r.output}")
    detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(r.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    print(f"rejects: {sum(r.reasons.values())} in {r.rejects}" + (f" ({detail})" if detail else ""))
    for name, s in zip(r.teachers, r.summaries):
        print(teacher_line([s], f"teacher {redact(name)}"))
    failed = sum(s.teacher_errors for s in r.summaries)
    if failed:
        print(f"warning: {failed} requests failed at a teacher (see the rejects); rerun the same command to retry them")

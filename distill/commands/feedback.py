"""`distill feedback`: a teacher (or a panel of judges) judges candidate responses into preference data (`synth.pipelines.feedback`)."""

from __future__ import annotations

import argparse

from distill.commands.common import (
    CACHE_KEYS,
    TEACHER_KEYS,
    Runnable,
    add_cache_flags,
    add_io_flags,
    add_teacher_flags,
    job_output,
    config_keys,
    pipeline_settings,
    print_stages,
)
from distill.config_flags import add_config_flags
from synth.pipelines import feedback
from synth.pipelines.stages import PIPELINE_FIELDS


def register(sub) -> None:
    """Add the `feedback` command."""
    p = sub.add_parser(
        "feedback",
        help="judge candidate responses into preference pairs (rate, pairwise, critique)",
        description="Each input line is {\"prompt\": ...} or {\"messages\": [...]}, optionally with \"responses\": [...]. "
        "Candidates come from the input, --student, --candidate-model or the teacher at --temperatures; "
        "each --judge (default: the teacher) judges them in its own cached job; the panel's scores are "
        "averaged (rate) or its consistent verdicts take a majority (pairwise).",
    )
    add_io_flags(p)
    p.add_argument("--judge", action="append", default=argparse.SUPPRESS, metavar="SPEC", help="a judge (repeat for a panel; default: the teacher)")
    p.add_argument("--student", default=argparse.SUPPRESS, metavar="SPEC", help="sample candidates from this student (e.g. hf:PATH, embedded)")
    p.add_argument("--candidate-model", dest="candidate_model", action="append", default=argparse.SUPPRESS, metavar="SPEC", help="also sample candidates from this model (repeatable)")
    add_config_flags(p, feedback.FeedbackSettings, "feedback settings", exclude=PIPELINE_FIELDS)
    add_teacher_flags(p)
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> feedback.FeedbackSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    return pipeline_settings(values, feedback.FeedbackSettings)


def execute(settings: feedback.FeedbackSettings) -> int:
    """Run the pipeline and print what it did."""
    with job_output(settings.output, dict(settings)):
        print_stages(feedback.run(settings))
        return 0


#: `distill feedback` as a recipe stage.
RUNNABLE = {
    "feedback": Runnable(
        config_keys(feedback.FeedbackSettings, PIPELINE_FIELDS) | TEACHER_KEYS | CACHE_KEYS | {"input", "output", "limit", "judge", "student", "candidate_model"},
        settings_from, execute, repeated=frozenset({"judge", "candidate_model"}),
    )
}

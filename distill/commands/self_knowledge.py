"""`distill self`: the student samples answers, scores them itself, keeps the best, optionally refined (`synth.pipelines.self_knowledge`)."""

from __future__ import annotations

import argparse

from distill.commands.common import CACHE_KEYS, Runnable, add_cache_flags, add_io_flags, job_output, config_keys, pipeline_settings, print_stages
from distill.config_flags import add_config_flags
from synth.pipelines import self_knowledge
from synth.pipelines.stages import PIPELINE_FIELDS


def register(sub) -> None:
    """Add the `self` command."""
    p = sub.add_parser(
        "self",
        help="the student judges its own samples: best answers (SFT) and best-vs-worst pairs",
        description="Each input line is {\"prompt\": ...} or {\"messages\": [...]}. The student samples --samples answers, "
        "scores them by self-reward (rating its own answers) or self-consistency (agreement of final answers), "
        "keeps the best (with --refine: rewritten once after its own critique), and pairs it with the worst.",
    )
    add_io_flags(p)
    add_config_flags(p, self_knowledge.SelfSettings, "self-knowledge settings", exclude=PIPELINE_FIELDS)
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> self_knowledge.SelfSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    return pipeline_settings(values, self_knowledge.SelfSettings)


def execute(settings: self_knowledge.SelfSettings) -> int:
    """Run the pipeline and print what it did."""
    with job_output(settings.output, dict(settings)):
        print_stages(self_knowledge.run(settings))
        return 0


#: `distill self` as a recipe stage (the student is its only model: no teacher).
RUNNABLE = {"self": Runnable(config_keys(self_knowledge.SelfSettings, PIPELINE_FIELDS) | CACHE_KEYS | {"input", "output", "limit"}, settings_from, execute)}

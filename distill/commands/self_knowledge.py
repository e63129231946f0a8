"""`distill self`: the student samples answers, scores them itself, keeps the best, optionally refined (`synth.pipelines.self_knowledge`)."""

from __future__ import annotations

import argparse

from distill.commands.common import add_cache_flags, add_io_flags, pipeline_settings, print_stages
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
    print_stages(self_knowledge.run(pipeline_settings(args, self_knowledge.SelfSettings)))
    return 0

"""`distill curate`: questions written to a taxonomy's cells (or a grown topic tree), then answered."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.commands.common import CACHE_KEYS, TEACHER_KEYS, Runnable, add_cache_flags, add_teacher_flags, job_output, config_keys, pipeline_settings, teacher_line
from distill.config_flags import add_config_flags
from synth.pipelines.curate import CurateResult, CurateSettings, run as run_curate
from synth.pipelines.stages import PIPELINE_FIELDS


def register(sub) -> None:
    """Add the `curate` command."""
    p = sub.add_parser(
        "curate",
        help="generate questions from meta-information (a taxonomy or a grown topic tree) and answer them",
        description="Every combination of (leaf topic, task type, difficulty[, knowledge point]) in a taxonomy "
        "is a cell; the teacher writes --per-cell questions for each cell (or a seeded sample of --max-cells "
        "cells), exact duplicates are dropped, and the teacher answers the rest. With --root-topic the teacher "
        "first grows the topic tree and it is written beside the output as OUT.tree.yaml (edit it, then pass "
        "it back with --taxonomy). Records are TRL prompt/completion chats with the cell in `meta`; a coverage "
        "summary (OUT.coverage.json, OUT.coverage.md) and one rejects file go beside the output. Every response "
        "is cached: a rerun sends nothing.",
    )
    p.add_argument("--output", required=True, type=Path, help="JSON Lines of SFT examples; rejects, coverage and tree go beside it")
    add_config_flags(p, CurateSettings, exclude=PIPELINE_FIELDS)
    add_teacher_flags(p)
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> CurateSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    return pipeline_settings(values, CurateSettings)


def execute(settings: CurateSettings) -> int:
    """Run the pipeline and print what it did."""
    with job_output(settings.output, dict(settings)):
        print_result(run_curate(settings))
        return 0



#: `distill curate` as a recipe stage.
RUNNABLE = {"curate": Runnable(config_keys(CurateSettings, PIPELINE_FIELDS) | TEACHER_KEYS | CACHE_KEYS | {"output"}, settings_from, execute)}


def print_result(r: CurateResult) -> None:
    """Where everything went, and what the teacher was asked."""
    if r.tree is not None:
        print(f"topic tree: {r.tree}")
    print(f"cells: {r.cells} of {r.cells_total}; questions kept: {r.questions} ({r.duplicates} duplicates dropped)")
    print(f"wrote {r.records} records to {r.output}")
    print(f"rejects: {r.rejected} in {r.rejects}")
    print(f"coverage: {r.coverage_json} and {r.coverage_md} ({r.empty_cells} of {r.cells} cells without records)")
    stages = r.stages.values()
    print(teacher_line(list(stages), after=f" over stages {', '.join(r.stages)}"))
    errors = sum(s.teacher_errors for s in stages)
    if errors:
        print(f"warning: {errors} requests failed at the teacher (see the rejects); rerun the same command to retry them")

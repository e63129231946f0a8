"""`distill generate`: run prompts through a teacher, with the cache, resume and a rejects file."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.commands.common import (
    add_cache_flags,
    add_sampling_flags,
    add_teacher_flags,
    limit_type,
    print_summary,
    run_settings,
    sampling_params,
    teacher_config,
)
from synth.generators.raw import RawGenerator
from synth.job import run_job
from synth.prompts import load_template


def register(sub) -> None:
    """Add the `generate` command."""
    p = sub.add_parser(
        "generate",
        help="run prompts through a teacher into SFT examples",
        description="Each input line is {\"prompt\": ...} or {\"messages\": [...]} (or any fields, with --template). "
        "Every response is cached before it is used: a rerun pays nothing for what it already has, "
        "and an interrupted run resumes where it stopped.",
    )
    p.add_argument("--input", required=True, type=Path, help="JSON Lines of prompts")
    p.add_argument("--output", required=True, type=Path, help="JSON Lines of SFT examples; rejects go beside it")
    p.add_argument("--template", help="fill this template (e.g. label/cot, or a .jinja file) with each input's fields")
    p.add_argument("--lang", default="en", choices=["en", "zh"], help="template language")
    p.add_argument("--system", help="system message added to every chat")
    p.add_argument("--limit", type=limit_type, help="only the first N inputs")
    add_teacher_flags(p)
    add_sampling_flags(p)
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    params = sampling_params(args)
    template = load_template(args.template, args.lang) if args.template else None

    def make(teacher):
        return RawGenerator(params, teacher.spec, template=template, system=args.system, tokenizer=teacher.tokenizer_name)

    summary = run_job(make, args.input, args.output, teacher_config(args), run_settings(args), limit=args.limit)
    print_summary(summary)
    return 0

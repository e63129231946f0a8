"""`distill eval`: students against their teacher on held-out prompts; eval.json, report.md, plots."""

from __future__ import annotations

import argparse

from distill.commands.common import Runnable, config_keys
from distill.config_flags import add_config_flags, load_config
from synth.redact import redact
from trainers.settings import EvalSettings


def register(sub) -> None:
    """Add `eval`, configured by --config FILE.yaml and flags."""
    p = sub.add_parser(
        "eval",
        help="compare students with their teacher on held-out prompts",
        description="Accuracy on checkable answers, agreement with the teacher's answers, NLL of the teacher's answers "
        "under each student (the teacher's own as the floor) and, with --judge, a pairwise win rate against the "
        "teacher with the order swapped. The teacher's and judge's answers are cached: a rerun never pays twice. "
        "Flags override the --config file.",
    )
    add_config_flags(p, EvalSettings, "evaluation settings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the comparison table."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> EvalSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    return load_config(argparse.Namespace(**values), EvalSettings)


def execute(config: EvalSettings) -> int:
    """Evaluate and print the comparison table."""
    # Imported when it runs: evaluation loads torch and transformers, which `distill --help` must not pay for.
    from trainers.evaluate import evaluate
    from trainers.report import fmt

    result = evaluate(config)
    teacher = result["teacher"]
    print(f"teacher {redact(teacher['spec'])}: {teacher['requests_sent']} requests sent, {teacher['cache_hits']} from the cache; "
          f"accuracy {fmt(teacher['accuracy'], percent=True)}, NLL floor {fmt(teacher['nll'])}")  # fmt: skip
    print(f"{'model':24} {'accuracy':>9} {'agree':>7} {'NLL':>7} {'closed':>7} {'judge':>7}")
    for m in result["models"]:
        judge = m.get("judge") or {}
        name = m["name"] + (" (before)" if m["role"] == "before" else "")
        print(f"{name[:24]:24} {fmt(m['accuracy'], percent=True):>9} {fmt(m['agreement'], percent=True):>7} "
              f"{fmt(m['nll']):>7} {fmt(m['gap_closed'], percent=True):>7} {fmt(judge.get('win_rate'), percent=True):>7}")  # fmt: skip
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"report: {config.output_dir / 'report.md'}  data: {config.output_dir / 'eval.json'}")
    return 0


#: `distill eval` as a recipe stage.
RUNNABLE = {"eval": Runnable(config_keys(EvalSettings), settings_from, execute)}

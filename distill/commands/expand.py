"""`distill expand self-instruct | evol`: from a few demonstrations to many new instruction/answer pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.commands.common import (
    add_cache_flags,
    add_teacher_flags,
    CACHE_KEYS,
    TEACHER_KEYS,
    Runnable,
    job_output,
    config_keys,
    pipeline_settings,
    teacher_line,
)
from distill.config_flags import add_config_flags
from synth.pipelines import evol, self_instruct
from synth.pipelines.expand import ExpandResult
from synth.pipelines.stages import PIPELINE_FIELDS

#: Evol reads its instructions (--input) and --limit as settings like any other, from flags or --config.
EVOL_OWN_FIELDS = PIPELINE_FIELDS - {"input", "limit"}


def register(sub) -> None:
    """Add the `expand` command and its two methods."""
    p = sub.add_parser(
        "expand",
        help="grow new instructions from seed tasks (self-instruct) or by evolving them (evol), and answer them",
        description="Two ways from a few demonstrations to many new pairs. Both filter near-duplicates (MinHash LSH "
        "on word shingles, plus exact matches after normalisation) against everything accepted so far, answer what "
        "is kept, and write TRL prompt/completion SFT examples with one rejects file beside them (every reject with "
        "its reason). Every response is cached: a rerun sends nothing and writes the same output. Dedup settings "
        "(threshold, shingle size, num_perm) go in the --config YAML under `dedup:`.",
    )
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    si = methods.add_parser(
        "self-instruct",
        help="Self-Instruct: sample demonstrations from a seed pool, ask for new instructions, filter, repeat, answer",
        description="Each round sends --requests-per-round requests, each showing --demos tasks sampled from the pool "
        "(seeded per round), and asks for --per-request new ones as JSON. New instructions that pass the filters "
        "(length, leading punctuation, non-text tasks such as images or drawing) and the near-duplicate filter join "
        "the pool, until --target are collected or --max-rounds pass; then each is answered. The new instructions "
        "are also written to OUT.work/instructions.jsonl.",
    )
    _common(si, self_instruct.SelfInstructSettings, PIPELINE_FIELDS)
    si.set_defaults(func=run)
    ev = methods.add_parser(
        "evol",
        help="Evol-Instruct: evolve instructions in depth and breadth, eliminate failures, answer survivors",
        description="Each round evolves every instruction with one seeded-random operation (constraints, deepen, "
        "concretize, reasoning, complicate_input: in depth; breadth: a new, rarer task). Evolutions are eliminated "
        "when they copy the rewriting prompt's wording, bring no information gain (a word-level heuristic, or "
        "--info-gain teacher to ask the teacher), near-duplicate an accepted instruction, or get a refusal or a "
        "too-short answer. Survivors are kept and evolve further in the next round.",
    )
    _common(ev, evol.EvolSettings, EVOL_OWN_FIELDS)
    ev.set_defaults(func=run)


def _common(p: argparse.ArgumentParser, model, own_fields) -> None:
    p.add_argument("--output", required=True, type=Path, help="JSON Lines of SFT examples; OUT.rejects.jsonl and the OUT.work/ stages go beside it")
    add_config_flags(p, model, exclude=own_fields)
    add_teacher_flags(p)
    add_cache_flags(p)


def run(args: argparse.Namespace) -> int:
    """Run `expand METHOD`: the same two steps a recipe stage takes."""
    method = RUNNABLE[f"expand {args.method}"]
    return method.execute(method.settings_from(vars(args)))


def execute(settings: self_instruct.SelfInstructSettings | evol.EvolSettings) -> int:
    """Run the method these settings configure and print what it did."""
    with job_output(settings.output, dict(settings)):
        if isinstance(settings, evol.EvolSettings):
            result = evol.run(settings)
            print(f"evolved instructions kept: {result.instructions} over {result.rounds} rounds")
        else:
            result = self_instruct.run(settings)
            print(f"new instructions: {result.instructions} in {result.rounds} rounds")
        print_result(result)
        return 0


#: `distill expand self-instruct` and `distill expand evol` as recipe stages; settings from flag values
#: (a parsed command line, or a recipe stage's keys).
RUNNABLE = {
    "expand self-instruct": Runnable(
        config_keys(self_instruct.SelfInstructSettings, PIPELINE_FIELDS) | TEACHER_KEYS | CACHE_KEYS | {"output"},
        lambda values: pipeline_settings(values, self_instruct.SelfInstructSettings), execute,
    ),
    "expand evol": Runnable(
        config_keys(evol.EvolSettings, EVOL_OWN_FIELDS) | TEACHER_KEYS | CACHE_KEYS | {"output"},
        lambda values: pipeline_settings(values, evol.EvolSettings, EVOL_OWN_FIELDS), execute,
    ),
}


def print_result(r: ExpandResult) -> None:
    """Counts kept and rejected by reason, the dedup stats, and what the teacher was asked."""
    print(f"wrote {r.records} records to {r.output}")
    print(f"rejects: {r.rejected} in {r.rejects}")
    for reason, count in sorted(r.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:6d}  {reason}")
    print(r.dedup.line())
    stages = r.stages.values()
    print(teacher_line(list(stages), after=f" over {len(r.stages)} stages"))
    errors = sum(s.teacher_errors for s in stages)
    if errors:
        print(f"warning: {errors} requests failed at the teacher (see the rejects); rerun the same command to retry them")

"""`distill run RECIPE.yaml`: run a recipe's stages in order, skipping those already done."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from distill.cli import debug_from_env, report_error
from distill.recipe import Stage, fingerprint, flag_values, load_recipe, parse_assignments, stage_runnable
from distill.recipe_state import clear_outputs, finished, made_before, mark, read_state, status
from synth.layout import read_rows, rejects_path


def register(sub) -> None:
    """Add the `run` command."""
    p = sub.add_parser(
        "run",
        help="run a recipe: synth → train → eval, resumable",
        description="Runs each stage of a recipe (any distill command with its settings). A stage whose arguments, "
        "inputs and code are unchanged since it finished is skipped; an interrupted one resumes from its cache "
        "or checkpoint; a changed one starts over, removing only what it made itself: any other file in the way "
        "of its output stops it before it starts.",
    )
    p.add_argument("recipe", help="the recipe YAML file")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every later one")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is already done; run nothing")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a recipe variable (over its vars: and the environment)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="set one stage setting, e.g. --set label.limit=8 (repeatable; checked like the recipe's own keys)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run (or plan) the recipe; stops at the first stage that fails."""
    from synth.datacard import check_card_target, write_data_card
    from synth.errors import ConfigError
    from synth.redact import redact_all

    variables = parse_assignments(args.var, "--var", dotted=False)
    recipe = load_recipe(args.recipe, variables, parse_assignments(args.set, "--set", dotted=True))
    names = [s.name for s in recipe.stages]
    if args.from_stage is not None and args.from_stage not in names:
        raise ConfigError(f"--from {args.from_stage}: no such stage (stages: {', '.join(names)})")
    forced = names[names.index(args.from_stage):] if args.from_stage else []
    print(f"recipe {recipe.name}: {len(recipe.stages)} stages")
    pending: set[str] = set()
    for i, stage in enumerate(recipe.stages, start=1):
        line = f"[{i}/{len(recipe.stages)}] {stage.name}: distill {' '.join(redact_all(stage.argv))}"
        waiting = [d for d in stage.depends if d in pending]
        if args.dry_run and waiting:
            print(f"{line}\n    todo (after {', '.join(waiting)})")
            pending.add(stage.name)
            continue
        # Fingerprinted only now: the inputs are what the earlier stages just wrote.
        stage.fingerprint = fingerprint(stage)
        state = "todo" if stage.name in forced else status(recipe, stage)
        if args.dry_run:
            print(f"{line}\n    {state}")
            if state != "done":
                pending.add(stage.name)
            continue
        if state == "done":
            print(f"{line}\n    done already (unchanged): skipped")
            continue
        if stage.output is not None and stage.output.suffix == ".jsonl":
            check_card_target(stage.output)  # a user's README.md where the card goes stops the stage before any work
        if state == "todo":
            made = clear_outputs(recipe, stage)  # before any work: what is in its way and not its own stops it
        else:
            made = list(made_before(read_state(recipe, stage), stage).values())  # an interrupted stage's partial outputs are its own
            print("    resuming an interrupted run")
        print(line, flush=True)
        mark(recipe, stage, "running", made)
        started = time.monotonic()
        code = run_stage(stage)
        gc.collect()  # stages load models; let the next one start with the memory back
        if code != 0:
            print(f"stage {stage.name} failed (exit {code}); fix it and rerun: finished stages are kept")
            return code
        failed = teacher_failures(stage.output)
        if failed:
            # Not done: marked as running, so the next `distill run` resumes it and asks again for exactly these.
            print(f"stage {stage.name}: {failed} inputs failed at the teacher (see {rejects_path(stage.output)}); "
                  "rerun the recipe to retry them (answers already received are cached and cost nothing)")
            return 1
        if stage.output is not None and stage.output.suffix == ".jsonl" and stage.output.is_file():
            inputs = [v for k, v in stage.settings.items() if k not in ("output", "teacher") and isinstance(v, str) and Path(v).exists()]
            print(f"    data card: {write_data_card(stage.output, inputs)}")
        mark(recipe, stage, "done", finished(made))
        print(f"    done in {time.monotonic() - started:.0f} s")
    if not args.dry_run:
        outputs = [(s.name, s.output) for s in recipe.stages if s.output is not None]
        print("outputs:")
        for name, out in outputs:
            print(f"  {name}: {out}{_what(out)}")
    return 0


def run_stage(stage: Stage) -> int:
    """Run one stage in this process, as its command would run; what stops it prints one line, as the CLI does."""
    runnable = stage_runnable(stage)
    try:
        return runnable.execute(runnable.settings_from(flag_values(stage.settings)))
    except (SystemExit, KeyboardInterrupt, Exception) as exc:
        return report_error(exc, debug_from_env())


def teacher_failures(output: Path | None) -> int:
    """How many of a synthesis stage's rejects are teacher failures that may pass when asked again (a 429, a 5xx,
    a timeout; not a 400, which fails the same way every time)."""
    if output is None or output.suffix != ".jsonl":
        return 0
    return sum(1 for row in read_rows(rejects_path(output)) if row.get("error") and row.get("retryable") is not False)


def _what(out: Path) -> str:
    """What a stage's output is, for the closing summary."""
    if out.suffix == ".jsonl":
        return "  (dataset; card: README.md beside it)"
    if (out / "report.md").is_file():
        return f"  (report: {out / 'report.md'})"
    if (out / "config.json").is_file():
        return "  (model)"
    return ""

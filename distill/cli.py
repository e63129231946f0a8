"""The `distill` command line: one subcommand per stage."""

from __future__ import annotations

import argparse
import sys

from synth.errors import DistillError
from synth.teachers.base import TeacherError


def command_modules() -> list[str]:
    """Every module in distill/commands that registers a subcommand."""
    import pkgutil

    import distill.commands as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "common")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="distill",
        description="Turn a teacher LLM into training data and distill a student from it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"distill.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit 1, Ctrl-C exits 130."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DistillError, TeacherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `distill` command line: one subcommand per stage."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from synth.errors import DistillError, DryRun
from synth.redact import redact
from synth.teachers.base import TeacherError

#: Set (to anything but 0) to print the traceback of an error as well as its one line; same as `--debug`.
DEBUG_ENV = "BBD_DEBUG"
ROOT = Path(__file__).resolve().parents[1]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line, redacted usage error and exit code 1 (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        # The usage text would bury the line that matters; `--help` still shows it.
        self.exit(1, f"{self.prog}: error: {redact(message)}\n")


def command_modules() -> list[str]:
    """Every module in distill/commands that registers a subcommand."""
    import pkgutil

    import distill.commands as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "common")


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered."""
    import importlib

    parser = Parser(
        prog="distill",
        description="Turn a teacher LLM into training data and distill a student from it.",
    )
    parser.add_argument("--debug", action="store_true", help=f"print the traceback of an error too (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"distill.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; any error prints one line and exits 1, Ctrl-C exits 130."""
    debug = debug_from_env()
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug
        return args.func(args)
    except (SystemExit, KeyboardInterrupt, Exception) as exc:
        return report_error(exc, debug)


def debug_from_env() -> bool:
    """Whether BBD_DEBUG asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def report_error(exc: BaseException, debug: bool = False) -> int:
    """Print what ended a command as one line on stderr (call it while handling `exc`) and return the exit code.

    --help or a usage error already printed is exit 0 or theirs, Ctrl-C 130, anything else 1
    (the safety net: whatever escaped becomes one line, never a traceback unless `debug`).
    """
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(redact(f"error: {exc.code}"), file=sys.stderr)
        return 1
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    if isinstance(exc, DryRun):
        print(str(exc))
        return 0
    if debug:
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
    print(redact(f"error: {describe_exception(exc, debug)}"), file=sys.stderr)
    return 1


def describe_exception(exc: BaseException, debug: bool = False) -> str:
    """One line saying what went wrong, and where when it is not one of our own errors."""
    if isinstance(exc, (DistillError, TeacherError)):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.filename is not None:
        paths = [_short(str(p)) for p in (exc.filename, exc.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {exc.strerror or exc}"
    if isinstance(exc, RecursionError):
        what = "the input is nested too deeply to process (RecursionError)"
    elif isinstance(exc, MemoryError):
        what = "out of memory (MemoryError): the input or a setting asks for more than this machine has"
    else:
        what = f"{type(exc).__name__}: {_one_line(str(exc)) or 'no message'}"
    where = _where(exc)
    hint = "" if debug else f"; rerun with --debug (or {DEBUG_ENV}=1) for the traceback"
    return f"{what} ({f'at {where}' if where else 'unexpected'}{hint})"


def _where(exc: BaseException) -> str:
    """`file:line` of the innermost frame of this project's code that the exception went through."""
    inside = [
        f for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(str(ROOT)) and "site-packages" not in f.filename  # the venv may live in the checkout
    ]
    if not inside:
        return ""
    frame = inside[-1]
    return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno} in {frame.name}"


def _one_line(text: str, limit: int = 600) -> str:
    """Text on one line (library messages span several), cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(path: str, limit: int = 200) -> str:
    """A path short enough to read (an over-long path is itself the error)."""
    return path if len(path) <= limit else f"{path[:100]}…{path[-60:]} ({len(path)} characters)"


if __name__ == "__main__":
    sys.exit(main())

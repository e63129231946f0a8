"""A recipe stage takes exactly the settings its command's flags take: RUNNABLE's keys cannot drift from the parser."""

from __future__ import annotations

import argparse

import pytest

from distill.cli import build_parser
from distill.recipe import runnables


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(words), parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, (*words, name))


PARSERS = dict(_commands(build_parser()))


def _flag_names(parser: argparse.ArgumentParser) -> list[set[str]]:
    """For each flag, the names a recipe key may give it: its dest and its long names with underscores."""
    names = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        names.append({action.dest} | {o[2:].replace("-", "_") for o in action.option_strings if o.startswith("--")})
    return names


@pytest.mark.parametrize("command", sorted(runnables()))
def test_a_stage_takes_every_flag_of_its_command_and_nothing_else(command):
    keys = runnables()[command].keys
    flags = _flag_names(PARSERS[command])
    missing = [sorted(f) for f in flags if not f & keys]
    unknown = sorted(k for k in keys if not any(k in f for f in flags))
    assert not missing and not unknown, f"{command}: flags no recipe key reaches {missing}; keys that are no flag {unknown}"


def test_every_command_a_recipe_used_to_run_is_runnable():
    # push takes its path as a positional argument and was never a recipe stage; run is the recipe runner itself.
    assert set(PARSERS) - set(runnables()) == {"push", "run"}

"""`distill teacher check`: what an endpoint supports (n, logprobs, JSON schema) and its latency."""

from __future__ import annotations

import argparse
import asyncio

from distill.commands.common import TEACHER_KEYS, Runnable, add_teacher_flags, teacher_config, teacher_overrides
from synth.redact import redact
from synth.teachers import TeacherSettings, build_teacher


def register(sub) -> None:
    """Add the `teacher` command group."""
    p = sub.add_parser("teacher", help="inspect a teacher", description="Inspect a teacher endpoint or model.")
    tsub = p.add_subparsers(dest="teacher_command", required=True, metavar="COMMAND")
    check = tsub.add_parser(
        "check",
        help="probe what a teacher supports and how fast it answers",
        description="Sends a few short real requests: does n>1 come back as n answers, do top-k logprobs come back, "
        "which JSON-output mode works, and the latency of one short answer.",
    )
    add_teacher_flags(check)
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Run the probe and print one line per capability."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> TeacherSettings:
    """The teacher's settings from flag values (a parsed command line, or a recipe stage's keys)."""
    return teacher_config(values.get("teacher") or "embedded", teacher_overrides(values))


def execute(config: TeacherSettings) -> int:
    """Run the probe and print one line per capability."""
    teacher = build_teacher(config)

    async def probe():
        try:
            return await teacher.capabilities()
        finally:
            await teacher.aclose()

    caps = asyncio.run(probe())
    print(f"teacher:      {redact(teacher.spec)}")
    print(f"n > 1:        {'yes' if caps.n else 'no (samples are requested one at a time with distinct seeds)'}")
    print(f"logprobs:     {'yes' if caps.logprobs else 'no (soft labels unavailable)'}")
    print(f"json output:  {caps.json_schema}")
    if caps.latency_s is not None:
        print(f"latency:      {caps.latency_s * 1000:.0f} ms for one short answer")
    for note in caps.notes:
        print(f"note:         {redact(note)}")
    return 0


#: `distill teacher check` as a recipe stage.
RUNNABLE = {"teacher check": Runnable(TEACHER_KEYS, settings_from, execute)}

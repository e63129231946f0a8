"""`distill batch status|cancel`: the Batch API batches a teacher's jobs submitted, as the provider sees them now."""

from __future__ import annotations

import argparse
import asyncio
import time

from pydantic import BaseModel, ConfigDict

from distill.commands.common import Runnable, teacher_config
from synth.errors import ConfigError
from synth.redact import redact
from synth.teachers import TeacherOverrides, TeacherSettings


class BatchCommandSettings(BaseModel):
    """Which teacher's batches, and which of them."""

    model_config = ConfigDict(extra="forbid")

    teacher: str
    api_key_env: str | None = None
    #: status: list collected batches too.
    all: bool = False
    #: cancel: only this batch id.
    batch: str | None = None
    action: str = "status"


def register(sub) -> None:
    """Add the `batch` command group."""
    p = sub.add_parser(
        "batch",
        help="see or stop the Batch API batches a teacher's jobs submitted",
        description="A teacher file with `batch: true` sends a job's requests through the provider's Batch API. These "
        "commands read the batches recorded beside the response cache and ask the provider how each one stands.",
    )
    bsub = p.add_subparsers(dest="batch_command", required=True, metavar="COMMAND")
    status = bsub.add_parser(
        "status",
        help="each batch not yet collected: its status and how many requests it answered",
        description="Lists the teacher's batches whose answers are not in the cache yet (running, or ended while no job "
        "was waiting: rerun the job to download them, at no cost), with the provider's status and counts.",
    )
    _common(status)
    status.add_argument("--all", action="store_true", help="list collected batches too")
    status.set_defaults(func=run, action="status")
    cancel = bsub.add_parser(
        "cancel",
        help="cancel the teacher's running batches",
        description="Asks the provider to cancel every running batch of the teacher (or the one --batch names). What a "
        "batch answered before it stopped is kept: rerun the job to collect it; the rest is asked again in a new batch.",
    )
    _common(cancel)
    cancel.add_argument("--batch", metavar="ID", help="cancel only this batch (an id `distill batch status` shows)")
    cancel.set_defaults(func=run, action="cancel")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, metavar="SPEC", help="the teacher, as the job named it: openai:MODEL@BASE_URL or a teacher .yaml file")
    p.add_argument("--api-key-env", help="environment variable holding the API key (default: the teacher file's, else OPENAI_API_KEY)")


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> BatchCommandSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    own = {k: values[k] for k in BatchCommandSettings.model_fields if values.get(k) is not None}
    if "teacher" not in own:
        raise ConfigError("distill batch: --teacher is required")
    return BatchCommandSettings(**own)


def _teacher_config(settings: BatchCommandSettings) -> TeacherSettings:
    overrides = TeacherOverrides(api_key_env=settings.api_key_env) if settings.api_key_env else TeacherOverrides()
    config = teacher_config(settings.teacher, overrides)
    if config.backend != "openai":
        raise ConfigError(f"teacher {redact(settings.teacher)}: batches are an openai-backend feature (backend: {config.backend})")
    return config.model_copy(update={"batch": True})


def execute(settings: BatchCommandSettings) -> int:
    """Print the batches, or cancel the running ones."""
    from synth.teachers.batch import BatchTeacher, state_path

    config = _teacher_config(settings)
    teacher = BatchTeacher(config)

    async def go():
        try:
            if settings.action == "cancel":
                return await teacher.cancel(settings.batch)
            return await teacher.report(collected=settings.all)
        finally:
            await teacher.aclose()

    result = asyncio.run(go())
    print(f"teacher: {redact(teacher.spec)} (batches recorded in {state_path(config)})")
    if settings.action == "cancel":
        if not result:
            which = f"batch {settings.batch}" if settings.batch else "batch"
            print(f"no running {which} of this teacher to cancel")
            return 0
        for batch_id, status in result:
            print(f"{batch_id}  {status}")
        print("what they answered before stopping is kept: rerun the job to collect it; the rest is asked again in a new batch")
        return 0
    if not result:
        print("no batch waiting to be collected" + ("" if settings.all else " (--all lists collected ones too)"))
        return 0
    for item in result:
        counts = f"{item['completed']}/{item['requests']} answered, {item['failed']} failed"
        state = "collected" if item["collected"] else "not collected: rerun the job" if item["status"] in _ENDED else ""
        extra = f"  ({state})" if state else ""
        error = f"  [cannot ask the provider: {item['error']}]" if item.get("error") else ""
        print(f"{item['batch_id'] or '-':<24} {item['status']:<12} {counts:<32} submitted {_ago(item['created'])}{extra}{error}")
    running = sum(1 for i in result if i["status"] not in _ENDED and i["status"] != "never created")
    waiting = sum(1 for i in result if i["status"] in _ENDED and not i["collected"])
    noun = "batch" if len(result) == 1 else "batches"
    print(f"{len(result)} {noun}: {running} running, {waiting} ended and not collected (the job that submitted them downloads "
          "their answers when rerun, at no cost)")  # fmt: skip
    return 0


_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


#: `distill batch status` and `distill batch cancel` as recipe stages.
RUNNABLE = {
    "batch status": Runnable(frozenset({"teacher", "api_key_env", "all"}), lambda v: settings_from({**v, "action": "status"}), execute),
    "batch cancel": Runnable(frozenset({"teacher", "api_key_env", "batch"}), lambda v: settings_from({**v, "action": "cancel"}), execute),
}

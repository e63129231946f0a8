"""`distill generate`: run prompts through a teacher, with the cache, resume and a rejects file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.commands.common import (
    CACHE_KEYS,
    TEACHER_KEYS,
    Runnable,
    add_cache_flags,
    add_sampling_flags,
    add_teacher_flags,
    job_output,
    limit_type,
    print_summary,
    read_json_schema,
    run_settings,
    teacher_config,
    teacher_overrides,
)
from distill.config_flags import describe_errors
from synth.errors import ConfigError
from synth.job import RunSettings, run_job
from synth.teachers import SamplingParams, TeacherOverrides
from synth.generators.raw import RawGenerator
from synth.prompts import load_template


#: The sampling flags, as SamplingParams names them (`--json-schema` names a file, read when the command runs).
SAMPLING_KEYS = ("n", "temperature", "top_p", "max_tokens", "seed", "stop", "logprobs")


class GenerateSettings(BaseModel):
    """Settings of `distill generate`: the files, the template, the teacher, sampling and the cache."""

    model_config = ConfigDict(extra="forbid")

    input: Path
    output: Path
    template: str | None = None
    lang: Literal["en", "zh"] = "en"
    system: str | None = None
    limit: int | None = Field(None, ge=1)
    teacher: str = "embedded"
    teacher_overrides: TeacherOverrides = TeacherOverrides()
    sampling: SamplingParams = SamplingParams()
    json_schema: Path | None = None
    keep_truncated: bool = False
    run: RunSettings = Field(default_factory=RunSettings)


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
    p.add_argument("--keep-truncated", action="store_true",
                   help="keep answers cut off at --max-tokens as records (default: they are rejects, named as truncated)")
    add_cache_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> GenerateSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys)."""
    given = {k: v for k, v in values.items() if k in SAMPLING_KEYS and v is not None}
    if "stop" in given and not isinstance(given["stop"], list):  # a recipe's `stop: "###"`: one stop string
        given["stop"] = [given["stop"]]
    try:
        sampling = SamplingParams(**given)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, set(given))) from None
    own = {k: values[k] for k in GenerateSettings.model_fields if k in values and values[k] is not None}
    try:
        return GenerateSettings(**own, sampling=sampling, teacher_overrides=teacher_overrides(values), run=run_settings(values))
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, set(own))) from None


def execute(settings: GenerateSettings) -> int:
    """Run prompts through the teacher and print what it cost."""
    params = settings.sampling
    if settings.json_schema is not None:
        params = params.model_copy(update={"json_schema": read_json_schema(settings.json_schema)})
    template = load_template(settings.template, settings.lang) if settings.template else None

    def make(teacher):
        return RawGenerator(params, teacher.spec, template=template, system=settings.system, tokenizer=teacher.tokenizer_name,
                            keep_truncated=settings.keep_truncated)  # fmt: skip

    teacher = teacher_config(settings.teacher, settings.teacher_overrides)
    with job_output(settings.output, dict(settings)):
        summary = run_job(make, settings.input, settings.output, teacher, settings.run, limit=settings.limit)
        print_summary(summary)
        return 0


#: `distill generate` as a recipe stage.
RUNNABLE = {
    "generate": Runnable(
        frozenset({"input", "output", "template", "lang", "system", "limit", "json_schema", "keep_truncated", *SAMPLING_KEYS}) | TEACHER_KEYS | CACHE_KEYS,
        settings_from, execute, repeated=frozenset({"stop"}),
    )
}

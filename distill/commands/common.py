"""Flags several commands share (the teacher, the cache, sampling, a pipeline's I/O) and how their results print."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from pydantic import BaseModel, Field, ValidationError, create_model

from distill.config_flags import checked_type, describe_errors, flag_fields, load_config, model_flag_type
from synth.errors import ConfigError
from synth.layout import check_output, sibling
from synth.output_lock import writing
from synth.job import JobSummary, RunSettings
from synth.pipelines.stages import PIPELINE_FIELDS, StagedResult
from synth.teachers import SamplingParams, TeacherSettings, TeacherOverrides, parse_teacher_spec

#: The teacher settings a flag can override, as TeacherSettings names them.
TEACHER_OVERRIDES = ("concurrency", "batch_size", "timeout", "max_retries", "api_key_env")

#: The response-cache flags as recipe keys (`no_cache: true` is `--no-cache`; `cache_mode` is the flags' dest).
CACHE_KEYS = frozenset({"cache_dir", "no_cache", "refresh", "cache_mode", "restart", "quiet", "reasoning", "budget_usd", "dry_run"})
#: What every command that asks a teacher takes besides its own settings: its teacher, their overrides, the cache.
TEACHER_KEYS = frozenset({"teacher", *TEACHER_OVERRIDES})
#: Keys that are a bare flag: `--quiet` when true, nothing when false.
SWITCHES = frozenset({"no_cache", "refresh", "restart", "quiet", "overwrite", "keep_truncated", "dry_run"})


@dataclass(frozen=True)
class Runnable:
    """A command as a recipe stage runs it: the keys it takes, its settings from them, and running those.

    The command line runs the same two functions on its parsed flags, so a recipe stage and the
    command it names cannot drift apart.
    """

    keys: frozenset[str]
    settings_from: Callable[[dict], Any]
    execute: Callable[[Any], int]
    #: Keys given once per value on a command line (`--teacher A --teacher B`), for printing a stage.
    repeated: frozenset[str] = frozenset()


def config_keys(model: type[BaseModel], exclude: Collection[str] = ()) -> frozenset[str]:
    """`config` and the keys `add_config_flags` makes flags of."""
    return frozenset({"config", *flag_fields(model, exclude)})


#: The overridable teacher settings with TeacherSettings' types and bounds, to check the values given.
_OVERRIDES = create_model("TeacherOverrideValues", **{k: (f.annotation, f) for k, f in TeacherSettings.model_fields.items() if k in TEACHER_OVERRIDES})

#: `--limit N`: a count of inputs, so at least 1 (leave the flag out for all of them).
limit_type = checked_type(int, Field(ge=1))
#: `--budget-usd X`: a positive, finite number of dollars.
budget_type = checked_type(float, Field(gt=0, allow_inf_nan=False))


def add_io_flags(p: argparse.ArgumentParser) -> None:
    """--input, --output, --limit."""
    p.add_argument("--input", required=True, type=Path, help="JSON Lines of prompts")
    p.add_argument("--output", required=True, type=Path, help="JSON Lines of records; rejects and stage files go beside it")
    p.add_argument("--limit", type=limit_type, help="only the first N inputs")


def pipeline_settings(values: dict, model: type[BaseModel], own: Collection[str] = PIPELINE_FIELDS):
    """A pipeline's settings from flag values (a parsed command line or a recipe stage): `config` and the
    method's keys, then the cache and teacher-override keys, which only a command line or a recipe sets.

    Nothing is checked on disk here (see `job_output`): a recipe validates every stage before any runs.
    """
    # The fields in `own` come from the command's own flags, never from generated flags or a --config file.
    settings = load_config(argparse.Namespace(**values), model, flags_only=own)
    return settings.model_copy(update={"run": run_settings(values), "teacher_overrides": teacher_overrides(values)})


@contextmanager
def job_output(output: Path, values: dict) -> Iterator[None]:
    """Refuse, before any request, an output the job must not write (one of the files `values` name, see
    `check_output`), then hold it for the block: a second process on the same output stops at once."""
    check_output(output, _named_files(values), also=[sibling(output, kind) for kind in ("sft", "pairs")])
    with writing(output):
        yield


def add_teacher_override_flags(g) -> None:
    """--concurrency, --batch-size, --timeout, --max-retries, --api-key-env: checked as a teacher file's keys are."""
    g.add_argument("--concurrency", type=model_flag_type(TeacherSettings, "concurrency"), help="requests in flight at once")
    g.add_argument("--batch-size", type=model_flag_type(TeacherSettings, "batch_size"), help="prompts per batch (local backends)")
    g.add_argument("--timeout", type=model_flag_type(TeacherSettings, "timeout"), help="seconds per request (openai)")
    g.add_argument("--max-retries", type=model_flag_type(TeacherSettings, "max_retries"), help="retries of transient failures (openai)")
    g.add_argument("--api-key-env", help="environment variable holding the API key (openai)")


def add_teacher_flags(parser: argparse.ArgumentParser) -> None:
    """--teacher SPEC and the overrides of its config."""
    g = parser.add_argument_group("teacher")
    g.add_argument("--teacher", default="embedded", metavar="SPEC",
                   help="embedded (default: the bundled SmolLM2-135M-Instruct), hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL, or a teacher .yaml file")
    add_teacher_override_flags(g)


def teacher_config(spec: str, overrides: TeacherOverrides) -> TeacherSettings:
    """The teacher config `spec` names, with the overrides applied and validated like the file's own keys."""
    config = parse_teacher_spec(spec)
    given = overrides.given()
    if not given:
        return config
    try:
        return TeacherSettings.model_validate({**config.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, set(given), f"teacher {spec}")) from None


def teacher_overrides(values: dict) -> TeacherOverrides:
    """The --concurrency, --batch-size, ... values given, for every teacher a command builds."""
    given = {key: values[key] for key in TEACHER_OVERRIDES if values.get(key) is not None}
    try:
        checked = _OVERRIDES.model_validate(given)  # as a teacher file's keys are checked: `concurrency: 0` is refused
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, set(given))) from None
    return TeacherOverrides(**{key: getattr(checked, key) for key in given})


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """--cache-dir, --no-cache, --refresh, --restart, --quiet."""
    g = parser.add_argument_group("response cache")
    g.add_argument("--cache-dir", type=Path, help="where responses are stored (default: $BBD_RESPONSE_CACHE or ~/.cache/blackbox-distill/responses)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--no-cache", dest="cache_mode", action="store_const", const="off", help="neither read nor store responses")
    mode.add_argument("--refresh", dest="cache_mode", action="store_const", const="refresh", help="ask the teacher again and overwrite cached responses")
    g.add_argument("--restart", action="store_true",
                   help="discard what an interrupted run left (OUT.partial, and the stage journals in OUT.work/) "
                   "and start over; cached responses are still used, so answers already received cost nothing")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    g.add_argument("--dry-run", action="store_true",
                   help="print what the job would ask for and cost at most, and send nothing (a multi-stage command: its first stage)")
    g.add_argument("--budget-usd", type=budget_type, metavar="USD",
                   help="stop sending requests before what is spent plus what is in flight could pass this (needs the teacher's "
                   "prices); inputs not sent are rejects with reason 'budget', and a rerun with a larger budget sends them")
    g.add_argument("--reasoning", choices=["keep", "drop", "inline"], default="keep",
                   help="a reasoning teacher's thinking: keep it in each record's 'reasoning' field (default; the answer alone is "
                   "trained on), drop it, or inline it as <think>...</think> before the answer, so a student learns to reason")
    parser.set_defaults(cache_mode="use")


def run_settings(values: dict) -> RunSettings:
    """Cache, progress and restart settings from the cache flags (`no_cache: true` in a recipe is `--no-cache`)."""
    mode = values.get("cache_mode") or ("off" if values.get("no_cache") else "refresh" if values.get("refresh") else "use")
    try:
        return RunSettings(
            cache_dir=values.get("cache_dir"), cache_mode=mode, progress=not values.get("quiet"), restart=bool(values.get("restart")),
            reasoning=values.get("reasoning") or "keep", budget_usd=_budget_value(values.get("budget_usd")),
            dry_run=bool(values.get("dry_run")),
        )
    except ValidationError as exc:  # a recipe's `reasoning: maybe`
        raise ConfigError(describe_errors(exc, {"reasoning"})) from None


def _budget_value(value: Any) -> float | None:
    """A recipe's `budget_usd:` checked as the flag is (a positive number of dollars)."""
    if value is None:
        return None
    try:
        return budget_type(str(value))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(f"budget_usd: {exc}") from None


def _named_files(values: dict) -> list[Path]:
    """The existing files the settings name (input, json_schema, ...): what the output must not be."""
    files = []
    for key, value in values.items():
        if key in ("output", "cache_dir") or not isinstance(value, (str, Path)) or not str(value):
            continue
        try:
            if Path(value).is_file():
                files.append(Path(value))
        except (OSError, ValueError):  # free text (a system prompt) is no path
            continue
    return files


def add_sampling_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """-n, --temperature, --top-p, --max-tokens, --seed, --stop, --logprobs, --json-schema."""
    base = SamplingParams(**defaults)
    g = parser.add_argument_group("sampling")
    def checked(name: str):
        return model_flag_type(SamplingParams, name)

    g.add_argument("-n", type=checked("n"), default=base.n, help=f"samples per input (default {base.n})")
    g.add_argument("--temperature", type=checked("temperature"), default=base.temperature, help=f"0 is greedy (default {base.temperature})")
    g.add_argument("--top-p", type=checked("top_p"), default=base.top_p, help=f"nucleus sampling (default {base.top_p})")
    g.add_argument("--max-tokens", type=checked("max_tokens"), default=base.max_tokens, help=f"longest answer (default {base.max_tokens})")
    g.add_argument("--seed", type=int, default=base.seed, help="base seed; each prompt's samples get their own seeds from it and the prompt")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=checked("logprobs"), metavar="K", help="store the teacher's top-K logprobs per token (soft labels)")
    g.add_argument("--json-schema", type=Path, metavar="FILE", help="ask for JSON matching this JSON Schema file; invalid answers are resampled once, then rejected")


def read_json_schema(path: Path) -> dict:
    """A JSON Schema file, checked against the JSON Schema meta-schema before any request asks for it."""
    import jsonschema

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a huge number
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ConfigError(f"{path}: not a readable JSON Schema file: {why}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{path}: not a valid JSON Schema: expected a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ConfigError(f"{path}: not a valid JSON Schema: {f'at {where}: ' if where else ''}{exc.message}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a valid JSON Schema: nested too deeply") from None
    return schema


def teacher_line(summaries: Collection[JobSummary], who: str = "teacher", after: str = "") -> str:
    """What the jobs asked a teacher and what it cost: requests, cache hits, retries, tokens, the price, the time."""
    total = {k: sum(getattr(x, k) for x in summaries) for k in
             ("requests_sent", "cache_hits", "retries", "prompt_tokens", "completion_tokens", "reasoning_tokens", "seconds")}  # fmt: skip
    costs = [x.cost for x in summaries if x.cost is not None]
    reasoning = f" ({total['reasoning_tokens']:,} of them reasoning)" if total["reasoning_tokens"] else ""
    cost = f", ${sum(costs):.4f}" if costs else ""
    return (
        f"{who}: {total['requests_sent']} requests sent, {total['cache_hits']} samples from cache, {total['retries']} retries, "
        f"{total['prompt_tokens']:,} prompt + {total['completion_tokens']:,} completion tokens{reasoning}{cost} "
        f"in {total['seconds']:.1f} s{after}"
    )


def print_summary(s: JobSummary) -> None:
    """Where the output went and what it cost."""
    print(f"wrote {s.records} records to {s.output}")
    print(f"rejects: {s.rejected} in {s.rejects}")
    resumed = f", {s.resumed} resumed from an earlier run" if s.resumed else ""
    if s.duplicates:
        plural = "s" if s.duplicates > 1 else ""
        resumed += f", {s.duplicates} duplicate input{plural} (the same task as an earlier line) done once"
    print(teacher_line([s], after=resumed))
    if s.teacher_errors:
        print(f"warning: {s.teacher_errors} inputs failed at the teacher (see the rejects); rerun the same command to retry them")


def print_stages(result: StagedResult) -> None:
    """Each stage, each file written, the rejects by reason and what the teachers cost."""
    for name, s in result.stages:
        print(f"stage {name}: {s.records} records, {s.rejected} rejects ({s.requests_sent} requests sent, {s.cache_hits} from cache, {s.seconds:.1f} s)")
    for noun, count, path in result.written:
        print(f"wrote {count} {noun} to {path}")
    print(f"rejects: {len(result.rejects)} in {result.rejects_path}")
    for reason, count in result.reasons():
        print(f"  {count} {reason}")
    print(teacher_line([x for _, x in result.stages], "teachers", f"; stage files in {result.stage_dir}"))
    if result.teacher_errors:
        print(f"warning: {result.teacher_errors} items failed at a teacher (see the rejects); rerun the same command to retry them")

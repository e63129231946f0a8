"""`distill feedback`: a teacher (or a panel of judges) judges candidate responses into preference data.

Stages, each a cached, resumable job under `OUT.work/`: candidates (from the input,
the student, other models, or the teacher at several temperatures), then one job per
judge, then a pure aggregation written atomically: `OUT` (+ `OUT.sft.jsonl` and
`OUT.pairs.jsonl` in critique mode) and `OUT.rejects.jsonl`.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.commands.common import add_cache_flags, add_teacher_flags, limit_type, run_settings
from distill.config_flags import add_config_flags, load_config
from synth.errors import ConfigError, InputError, describe_validation_error
from synth.generators.feedback import (
    CandidateGenerator,
    FeedbackInput,
    Prompted,
    assemble,
    candidates_from_rows,
    reason_category,
)
from synth.generators.feedback_critique import (
    CritiqueGenerator,
    all_critique_records,
    critique_items,
)
from synth.generators.feedback_pairwise import (
    PairwiseGenerator,
    pair_items,
    pairwise_records,
)
from synth.generators.feedback_rate import (
    DEFAULT_ASPECTS,
    RateGenerator,
    rate_items,
    rate_records,
)
from synth.io import read_jsonl
from synth.job import JobSummary, RunSettings, run_job
from synth.layout import read_rows, rejects_path, sibling, stage_output, write_jsonl_atomic
from synth.prompts import load_template
from synth.redact import redact, redact_data
from synth.records import Provenance, stable_id
from synth.teachers import (
    SamplingParams,
    TeacherConfig,
    build_teacher,
    parse_teacher_spec,
)
from synth.teachers.base import Teacher

#: A teacher spec (embedded, hf:PATH, vllm:MODEL, openai:MODEL@URL, FILE.yaml); set by its own repeatable flag.
Spec = Annotated[str, Field(min_length=1)]
#: Teacher temperatures for candidates when the input has none and no other source is named.
FALLBACK_TEMPERATURES = [0.2, 1.0]


class FeedbackConfig(BaseModel):
    """Settings of `distill feedback`; every field has a default that runs."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["rate", "pairwise", "critique"] = Field("rate", description="rate: 1-10 per aspect; pairwise: A vs B both orders; critique: critique + corrected response")
    judge: list[Spec] = Field(default_factory=list, description="Judge specs (repeat --judge for a panel); default: the teacher.")
    student: Spec | None = Field(None, description="Student spec whose samples become candidates.")
    candidate_model: list[Spec] = Field(default_factory=list, description="Other models whose samples become candidates.")
    temperatures: list[float] = Field(default_factory=list, description=f"Teacher temperatures for candidates (default {FALLBACK_TEMPERATURES} for inputs without responses when no other source is named)")
    candidates_per_source: int = Field(2, ge=1, description="Samples from each candidate source per input.")
    candidate_temperature: float = Field(0.8, ge=0, description="Sampling temperature of the student and candidate models.")
    candidate_max_tokens: int = Field(256, ge=1, description="Longest candidate response.")
    judge_temperature: float = Field(0.3, ge=0, description="Judges' sampling temperature, seeded; at 0 (greedy) an unparsable reply is rejected without the resample, which would repeat it.")
    judge_max_tokens: int = Field(512, ge=1, description="Longest judge reply (the JSON).")
    aspects: list[str] = Field(default_factory=lambda: list(DEFAULT_ASPECTS), min_length=1, description="Rate mode: the aspects scored 1-10.")
    min_margin: float = Field(1.0, ge=0, description="Rate mode: least overall-score gap between chosen and rejected.")
    seed: int = Field(0, description="Base seed of candidate and judge samples.")
    lang: Literal["en", "zh"] = Field("en", description="Template language.")
    verdict_logprobs: int | None = Field(
        None, ge=2, le=20,
        description="Pairwise: ask judges for this many top logprobs and decide each pair by how much P(A) moves when the order is swapped, "
        "which cancels a position bias (small judges answer 'A' in both orders); a judge's reply without logprobs falls back to its verdicts.",
    )
    min_shift: float = Field(0.05, ge=0, lt=1, description="With verdict_logprobs: the least change of P(A) between the two orders that decides a pair (less is a tie).")
    prompt_field: str = Field("prompt", min_length=1, description="Input field holding the prompt when it is not 'prompt' (question for GSM8K, instruction for the Self-Instruct seeds).")


def register(sub) -> None:
    """Add the `feedback` command."""
    p = sub.add_parser(
        "feedback",
        help="judge candidate responses into preference pairs (rate, pairwise, critique)",
        description="Each input line is {\"prompt\": ...} or {\"messages\": [...]}, optionally with \"responses\": [...]. "
        "Candidates come from the input, --student, --candidate-model or the teacher at --temperatures; "
        "each --judge (default: the teacher) judges them in its own cached job; the panel's scores are "
        "averaged (rate) or its consistent verdicts take a majority (pairwise).",
    )
    add_io_flags(p)
    p.add_argument("--judge", action="append", default=argparse.SUPPRESS, metavar="SPEC", help="a judge (repeat for a panel; default: the teacher)")
    p.add_argument("--student", default=argparse.SUPPRESS, metavar="SPEC", help="sample candidates from this student (e.g. hf:PATH, embedded)")
    p.add_argument("--candidate-model", dest="candidate_model", action="append", default=argparse.SUPPRESS, metavar="SPEC", help="also sample candidates from this model (repeatable)")
    add_config_flags(p, FeedbackConfig, "feedback settings")
    add_teacher_flags(p)
    add_cache_flags(p)
    p.set_defaults(func=run)


def add_io_flags(p: argparse.ArgumentParser) -> None:
    """--input, --output, --limit."""
    p.add_argument("--input", required=True, type=Path, help="JSON Lines of prompts")
    p.add_argument("--output", required=True, type=Path, help="JSON Lines of records; rejects and stage files go beside it")
    p.add_argument("--limit", type=limit_type, help="only the first N inputs")


class TeacherPool:
    """Builds each distinct teacher once, so stages that share a model share one loaded copy."""

    def __init__(self):
        self._built: dict[str, Teacher] = {}

    def get(self, config: TeacherConfig) -> Teacher:
        """The teacher for a config, built on first use."""
        key = config.model_dump_json()
        if key not in self._built:
            self._built[key] = build_teacher(config)
        return self._built[key]

    def close(self) -> None:
        """Release every teacher built."""
        for teacher in self._built.values():
            asyncio.run(teacher.aclose())
        self._built.clear()


@dataclass
class Stages:
    """The stages a command ran: their summaries, records and rejects."""

    output: Path
    settings: RunSettings
    pool: TeacherPool
    summaries: list[tuple[str, JobSummary]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, make: Callable[[Teacher], Any], items: list[tuple[str, BaseModel]], config: TeacherConfig) -> list[dict[str, Any]]:
        """Run one cached job over `items` into `OUT.work/NAME.jsonl`; returns its records (its rejects are kept)."""
        if not items:
            return []
        out = stage_output(self.output, name)
        summary = run_job(make, lambda: iter(items), out, self.pool.get(config), self.settings, label=name)
        self.summaries.append((name, summary))
        self.rejects.extend(read_rows(summary.rejects))
        return read_rows(out)

    def report(self, written: list[tuple[str, int, Path]], rejects: list[dict[str, Any]]) -> None:
        """Print each stage, each file written, the rejects by reason and what the teachers cost."""
        for name, s in self.summaries:
            print(f"stage {name}: {s.records} records, {s.rejected} rejects ({s.requests_sent} requests sent, {s.cache_hits} from cache, {s.seconds:.1f} s)")
        for noun, count, path in written:
            print(f"wrote {count} {noun} to {path}")
        print(f"rejects: {len(rejects)} in {rejects_path(self.output)}")
        for reason, count in Counter(reason_category(r["reason"]) for r in rejects).most_common():
            print(f"  {count} {reason}")
        sent = sum(s.requests_sent for _, s in self.summaries)
        hits = sum(s.cache_hits for _, s in self.summaries)
        errors = sum(s.teacher_errors for _, s in self.summaries)
        print(f"teachers: {sent} requests sent, {hits} samples from cache; stage files in {stage_output(self.output, 'x').parent}")
        if errors:
            print(f"warning: {errors} items failed at a teacher (see the rejects); rerun the same command to retry them")


def read_inputs(path: Path, limit: int | None, prompt_field: str = "prompt") -> list[tuple[str, FeedbackInput]]:
    """Every input line (validated before any work), up to `limit`; `prompt_field` names the prompt's field."""
    if prompt_field == "prompt":
        return [(f"{path}:{n}", item) for n, item in islice(read_jsonl(path, FeedbackInput), limit)]
    items = []
    for n, obj in islice(read_jsonl(path), limit):
        # Seed sets name their prompts otherwise (question, instruction): read them as they are, no copy to convert.
        if not isinstance(obj, dict) or not isinstance(obj.get(prompt_field), str) or "prompt" in obj:
            raise InputError(f"{path}:{n}: field '{prompt_field}': expected a string (and no 'prompt' field beside it)")
        try:
            items.append((f"{path}:{n}", FeedbackInput.model_validate({**obj, "prompt": obj[prompt_field]})))
        except ValidationError as exc:
            raise InputError(f"{path}:{n}: {describe_validation_error(exc)}") from None
    return items


def spec_config(spec: str, args: argparse.Namespace) -> TeacherConfig:
    """A teacher config from a spec, with the --concurrency/--batch-size/... overrides applied."""
    config = parse_teacher_spec(spec)
    overrides = {k: getattr(args, k) for k in ("concurrency", "batch_size", "timeout", "max_retries", "api_key_env") if getattr(args, k, None) is not None}
    return config.model_copy(update=overrides) if overrides else config


def candidate_stages(stages: Stages, inputs, sources: list[tuple[str, str, TeacherConfig, SamplingParams, bool]]) -> dict[str, list[tuple[str, str]]]:
    """Run each (label, stage, teacher, params, only-inputs-without-responses) source; candidates by input key."""
    found: dict[str, list[tuple[str, str]]] = {}
    for label, name, config, params, only_missing in sources:
        items = [(w, it) for w, it in inputs if not (only_missing and it.responses)]
        rows = stages.run(name, lambda t, p=params, s=label: CandidateGenerator(p, t.spec, s), items, config)
        for key, cands in candidates_from_rows(rows).items():
            found.setdefault(key, []).extend(cands)
    return found


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    config: FeedbackConfig = load_config(args, FeedbackConfig)
    teacher = spec_config(args.teacher, args)
    inputs = read_inputs(args.input, args.limit, config.prompt_field)
    if args.output.resolve() == args.input.resolve():
        raise ConfigError(f"{args.output}: the output would overwrite the input")
    judges = [spec_config(s, args) for s in config.judge] or [teacher]
    dumped = [j.model_dump_json() for j in judges]
    if len(set(dumped)) < len(dumped):
        raise ConfigError("the same judge is named twice: a panel needs distinct judges")
    template = load_template(f"feedback/{config.mode}", config.lang)

    stages = Stages(args.output, run_settings(args), TeacherPool())
    try:
        # Built now (cheap: models load on first use) so a clash of names fails before any work.
        judge_names = [stages.pool.get(j).spec for j in judges]
        if len(set(judge_names)) < len(judge_names):
            raise ConfigError(f"judges {', '.join(judge_names)}: two have the same name; the panel tells judges apart by name")
        candidates = candidate_stages(stages, inputs, feedback_sources(config, teacher, args))
        prompted = assemble(inputs, candidates)
        judged = [judge_stage(stages, config, template, j, n, prompted) for n, j in enumerate(judges)]
    finally:
        stages.pool.close()
    provenance = Provenance(
        teacher=",".join(judge_names), method=f"feedback-{config.mode}", template=template.name, template_hash=template.hash,
        params=redact_data(config.model_dump(mode="json", exclude={"lang"})), task="",
    )
    rows = [row for judge_rows in judged for row in judge_rows]
    written, rejects = aggregate(config.mode, prompted, rows, judge_names, config, provenance, args.output)
    all_rejects = [*stages.rejects, *rejects]
    write_jsonl_atomic(rejects_path(args.output), all_rejects)
    stages.report(written, all_rejects)
    return 0


def feedback_sources(config: FeedbackConfig, teacher: TeacherConfig, args) -> list:
    """The candidate sources the config names, or the teacher at the fallback temperatures."""
    k, seed = config.candidates_per_source, config.seed
    sample = SamplingParams(temperature=config.candidate_temperature, max_tokens=config.candidate_max_tokens, n=k, seed=seed)
    sources = []
    if config.student:
        sources.append((f"student {redact(config.student)}", "candidates-student", spec_config(config.student, args), sample, False))
    for spec in config.candidate_model:
        sources.append((f"model {redact(spec)}", f"candidates-model-{stable_id(spec)[:8]}", spec_config(spec, args), sample, False))
    temperatures, only_missing = (config.temperatures, False) if config.temperatures or sources else (FALLBACK_TEMPERATURES, True)
    for t in temperatures:
        params = sample.model_copy(update={"temperature": t})
        sources.append((f"teacher T={t:g}", f"candidates-t{t:g}", teacher, params, only_missing))
    return sources


def judge_stage(stages: Stages, config: FeedbackConfig, template, judge: TeacherConfig, n: int, prompted: list[Prompted]) -> list[dict[str, Any]]:
    """One judge's job over every item of the mode; its Judgment rows."""
    logprobs = config.verdict_logprobs if config.mode == "pairwise" else None
    params = SamplingParams(temperature=config.judge_temperature, max_tokens=config.judge_max_tokens, seed=config.seed, logprobs=logprobs)
    name = f"{config.mode}-judge{n + 1}-{stable_id(judge.model_dump(mode='json'))[:8]}"
    if config.mode == "rate":
        return stages.run(name, lambda t: RateGenerator(params, t.spec, template, config.aspects), rate_items(prompted), judge)
    if config.mode == "pairwise":
        return stages.run(name, lambda t: PairwiseGenerator(params, t.spec, template), pair_items(prompted), judge)
    return stages.run(name, lambda t: CritiqueGenerator(params, t.spec, template), critique_items(prompted), judge)


def aggregate(mode: str, prompted: list[Prompted], rows: list[dict[str, Any]], judges: list[str], config: FeedbackConfig, provenance: Provenance, output: Path):
    """Turn every judge's judgments into the mode's records and write them atomically; ([(noun, count, path)], rejects)."""
    sft, pairs = [], []
    if mode == "rate":
        records, rejects = rate_records(prompted, rows, config.min_margin, provenance)
    elif mode == "pairwise":
        records, rejects = pairwise_records(prompted, rows, judges, provenance, config.min_shift if config.verdict_logprobs else None)
    else:
        records, sft, pairs, rejects = all_critique_records(prompted, rows, judges, provenance)
    noun = "critiques" if mode == "critique" else "preference pairs"
    written = [(noun, write_jsonl_atomic(output, records), output)]
    if mode == "critique":
        for kind, kept, what in (("sft", sft, "SFT examples (prompt -> corrected)"), ("pairs", pairs, "preference pairs (corrected over original)")):
            path = sibling(output, kind)
            written.append((what, write_jsonl_atomic(path, kept), path))
    return written, [r.model_dump(mode="json", exclude_none=True) for r in rejects]

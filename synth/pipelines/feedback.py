"""Feedback: a teacher (or a panel of judges) judges candidate responses into preference data.

Stages, each a cached, resumable job under `OUT.work/`: candidates (from the input,
the student, other models, or the teacher at several temperatures), then one job per
judge, then a pure aggregation written atomically: `OUT` (+ `OUT.sft.jsonl` and
`OUT.pairs.jsonl` in critique mode) and `OUT.rejects.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from synth.errors import ConfigError
from synth.generators.feedback.base import CandidateGenerator, Prompted, assemble, candidates_from_rows
from synth.generators.feedback.critique import CritiqueGenerator, all_critique_records, critique_items
from synth.generators.feedback.pairwise import PairwiseGenerator, pair_items, pairwise_records
from synth.generators.feedback.rate import DEFAULT_ASPECTS, RateGenerator, rate_items, rate_records
from synth.layout import check_output, sibling, write_jsonl_atomic
from synth.pipelines.stages import PIPELINE_FIELDS, PipelineSettings, StagedResult, Stages, TeacherPool, read_inputs
from synth.prompts import load_template
from synth.records import Provenance, stable_id
from synth.redact import redact, redact_data
from synth.teachers import SamplingParams, TeacherSettings, resolve_teacher

#: A teacher spec (embedded, hf:PATH, vllm:MODEL, openai:MODEL@URL, FILE.yaml); set by its own repeatable flag.
Spec = Annotated[str, Field(min_length=1)]
#: Teacher temperatures for candidates when the input has none and no other source is named.
FALLBACK_TEMPERATURES = [0.2, 1.0]


class FeedbackSettings(PipelineSettings):
    """Settings of the feedback pipeline; every method option has a default that runs."""

    input: Path = Field(description="JSON Lines of prompts.")
    output: Path = Field(description="JSON Lines of records; rejects and stage files go beside it.")
    limit: int | None = Field(None, ge=1, description="Only the first N inputs.")
    teacher: str = Field("embedded", description="The teacher spec: candidates at --temperatures, and the judge when none is named.")

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


class FeedbackResult(StagedResult):
    """What a feedback run did: each stage, each file written, every reject."""


def output_kind(settings: dict[str, Any]) -> str | None:
    """The kind of record the output holds (a recipe checks it against what a later stage reads): preference pairs
    in rate and pairwise mode, critiques in critique mode (SFT and pairs go beside them); None when a config file may set the mode."""
    if "mode" not in settings and "config" in settings:
        return None
    return "critique" if settings.get("mode", FeedbackSettings.model_fields["mode"].default) == "critique" else "preference"


def run(settings: FeedbackSettings) -> FeedbackResult:
    """Validate everything, run the candidate and judge stages, aggregate and write the records and rejects."""
    teacher = resolve_teacher(settings.teacher, settings.teacher_overrides)
    inputs = read_inputs(settings.input, settings.limit, settings.prompt_field)
    if settings.output.resolve() == settings.input.resolve():
        raise ConfigError(f"{settings.output}: the output would overwrite the input")
    judges = [resolve_teacher(s, settings.teacher_overrides) for s in settings.judge] or [teacher]
    dumped = [j.model_dump_json() for j in judges]
    if len(set(dumped)) < len(dumped):
        raise ConfigError("the same judge is named twice: a panel needs distinct judges")
    template = load_template(f"feedback/{settings.mode}", settings.lang)

    check_output(settings.output, [settings.input], also=[sibling(settings.output, kind) for kind in ("sft", "pairs")])
    stages = Stages(settings.output, settings.run, TeacherPool())
    try:
        # Built now (cheap: models load on first use) so a clash of names fails before any work.
        judge_names = [stages.pool.get(j).spec for j in judges]
        if len(set(judge_names)) < len(judge_names):
            raise ConfigError(f"judges {', '.join(judge_names)}: two have the same name; the panel tells judges apart by name")
        candidates = candidate_stages(stages, inputs, feedback_sources(settings, teacher))
        prompted = assemble(inputs, candidates)
        judged = [judge_stage(stages, settings, template, j, n, prompted) for n, j in enumerate(judges)]
    finally:
        stages.pool.close()
    provenance = Provenance(
        teacher=",".join(judge_names), method=f"feedback-{settings.mode}", template=template.name, template_hash=template.hash,
        params=redact_data(settings.model_dump(mode="json", exclude={"lang", *PIPELINE_FIELDS})), task="",
    )
    rows = [row for judge_rows in judged for row in judge_rows]
    written, rejects = aggregate(prompted, rows, judge_names, settings, provenance)
    return stages.finish(written, rejects, FeedbackResult)


def feedback_sources(settings: FeedbackSettings, teacher: TeacherSettings) -> list[tuple[str, str, TeacherSettings, SamplingParams, bool]]:
    """The candidate sources the settings name, or the teacher at the fallback temperatures."""
    k, seed = settings.candidates_per_source, settings.seed
    sample = SamplingParams(temperature=settings.candidate_temperature, max_tokens=settings.candidate_max_tokens, n=k, seed=seed)
    sources = []
    if settings.student:
        student = resolve_teacher(settings.student, settings.teacher_overrides)
        sources.append((f"student {redact(settings.student)}", "candidates-student", student, sample, False))
    for spec in settings.candidate_model:
        model = resolve_teacher(spec, settings.teacher_overrides)
        sources.append((f"model {redact(spec)}", f"candidates-model-{stable_id(spec)[:8]}", model, sample, False))
    temperatures, only_missing = (settings.temperatures, False) if settings.temperatures or sources else (FALLBACK_TEMPERATURES, True)
    for t in temperatures:
        params = sample.model_copy(update={"temperature": t})
        sources.append((f"teacher T={t:g}", f"candidates-t{t:g}", teacher, params, only_missing))
    return sources


def candidate_stages(stages: Stages, inputs, sources: list[tuple[str, str, TeacherSettings, SamplingParams, bool]]) -> dict[str, list[tuple[str, str]]]:
    """Run each (label, stage, teacher, params, only-inputs-without-responses) source; candidates by input key."""
    found: dict[str, list[tuple[str, str]]] = {}
    for label, name, config, params, only_missing in sources:
        items = [(w, it) for w, it in inputs if not (only_missing and it.responses)]
        rows = stages.run(name, lambda t, p=params, s=label: CandidateGenerator(p, t.spec, s), items, config)
        for key, cands in candidates_from_rows(rows).items():
            found.setdefault(key, []).extend(cands)
    return found


def judge_stage(stages: Stages, settings: FeedbackSettings, template, judge: TeacherSettings, n: int, prompted: list[Prompted]) -> list[dict[str, Any]]:
    """One judge's job over every item of the mode; its Judgment rows."""
    logprobs = settings.verdict_logprobs if settings.mode == "pairwise" else None
    params = SamplingParams(temperature=settings.judge_temperature, max_tokens=settings.judge_max_tokens, seed=settings.seed, logprobs=logprobs)
    name = f"{settings.mode}-judge{n + 1}-{stable_id(judge.model_dump(mode='json'))[:8]}"
    if settings.mode == "rate":
        return stages.run(name, lambda t: RateGenerator(params, t.spec, template, settings.aspects), rate_items(prompted), judge)
    if settings.mode == "pairwise":
        return stages.run(name, lambda t: PairwiseGenerator(params, t.spec, template), pair_items(prompted), judge)
    return stages.run(name, lambda t: CritiqueGenerator(params, t.spec, template), critique_items(prompted), judge)


def aggregate(prompted: list[Prompted], rows: list[dict[str, Any]], judges: list[str], settings: FeedbackSettings, provenance: Provenance):
    """Turn every judge's judgments into the mode's records and write them atomically; ([(noun, count, path)], rejects)."""
    mode, output = settings.mode, settings.output
    sft, pairs = [], []
    if mode == "rate":
        records, rejects = rate_records(prompted, rows, settings.min_margin, provenance)
    elif mode == "pairwise":
        records, rejects = pairwise_records(prompted, rows, judges, provenance, settings.min_shift if settings.verdict_logprobs else None)
    else:
        records, sft, pairs, rejects = all_critique_records(prompted, rows, judges, provenance)
    noun = "critiques" if mode == "critique" else "preference pairs"
    written = [(noun, write_jsonl_atomic(output, records), output)]
    if mode == "critique":
        for kind, kept, what in (("sft", sft, "SFT examples (prompt -> corrected)"), ("pairs", pairs, "preference pairs (corrected over original)")):
            path = sibling(output, kind)
            written.append((what, write_jsonl_atomic(path, kept), path))
    return written, [r.model_dump(mode="json", exclude_none=True) for r in rejects]

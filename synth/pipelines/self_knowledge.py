"""Self-knowledge: the student samples answers, scores them itself, keeps the best (optionally refined).

Stages under `OUT.work/`: samples, then self-reward ratings (or, for self-consistency,
no requests at all), then with `refine` a self-critique and a rewrite of each best
answer. Writes SFT examples to `OUT`, best-vs-worst pairs to `OUT.pairs.jsonl`, and
`OUT.rejects.jsonl`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synth.filters.verify import get_checker, probe_checker
from synth.generators.feedback.base import CandidateGenerator, Prompted, assemble, candidates_from_rows
from synth.generators.feedback.rate import DEFAULT_ASPECTS, RateGenerator, panel_scores, rate_items, ratings_by_key
from synth.generators.raw import RawGenerator, TemplateInput
from synth.generators.feedback.self_knowledge import best_index, consistency_scores, self_records
from synth.layout import check_output, sibling, write_jsonl_atomic
from synth.pipelines.stages import PIPELINE_FIELDS, PipelineSettings, StagedResult, Stages, TeacherPool, read_inputs
from synth.prompts import load_template
from synth.records import Provenance
from synth.redact import redact_data
from synth.teachers import SamplingParams, TeacherSettings, resolve_teacher


class SelfSettings(PipelineSettings):
    """Settings of the self-knowledge pipeline; every method option has a default that runs."""

    input: Path = Field(description="JSON Lines of prompts.")
    output: Path = Field(description="JSON Lines of SFT examples; pairs, rejects and stage files go beside it.")
    limit: int | None = Field(None, ge=1, description="Only the first N inputs.")

    student: str = Field("embedded", min_length=1, description="The student spec (embedded, hf:PATH, vllm:MODEL, openai:MODEL@URL, FILE.yaml).")
    samples: int = Field(4, ge=1, description="Responses the student samples per prompt.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature of the responses.")
    max_tokens: int = Field(256, ge=1, description="Longest response.")
    judge_by: Literal["self-reward", "consistency"] = Field("self-reward", description="self-reward: the student rates each sample; consistency: samples agreeing on the final answer win")
    aspects: list[str] = Field(default_factory=lambda: list(DEFAULT_ASPECTS), min_length=1, description="Self-reward: the aspects rated 1-10.")
    judge_max_tokens: int = Field(256, ge=1, description="Self-reward: longest rating reply (the JSON).")
    judge_temperature: float = Field(0.3, ge=0, description="Self-reward: rating temperature, seeded (at 0 an unparsable rating is not resampled).")
    checker: str = Field("numeric", description="Consistency: how final answers compare (numeric, exact, or module:function).")
    min_votes: int = Field(2, ge=1, description="Consistency: least samples that must agree on the best answer.")
    min_margin: float = Field(1.0, ge=0, description="Least score gap between best and worst for a preference pair (votes for consistency).")
    refine: bool = Field(False, description="Have the student critique its best answer and rewrite it once.")
    refine_max_tokens: int = Field(256, ge=1, description="Longest critique and rewrite.")
    seed: int = Field(0, description="Base seed of the samples.")
    lang: Literal["en", "zh"] = Field("en", description="Template language.")


class SelfResult(StagedResult):
    """What a self-knowledge run did: each stage, each file written, every reject."""


def output_kind(settings: dict[str, Any]) -> str | None:
    """The kind of record the output holds (a recipe checks it against what a later stage reads): SFT examples (the pairs go beside them)."""
    return "sft"


def run(settings: SelfSettings) -> SelfResult:
    """Validate everything, sample and score the student's answers (refine the best), write the records and rejects."""
    checker = get_checker(settings.checker) if settings.judge_by == "consistency" else None
    if checker is not None:
        probe_checker(settings.checker, "42", "a sample answer")  # before the student and teacher are paid
    inputs = read_inputs(settings.input, settings.limit)
    student = resolve_teacher(settings.student, settings.teacher_overrides)
    templates = {name: load_template(f"self/{name}", settings.lang) for name in ("reward", "critique", "refine")}
    check_output(settings.output, [settings.input], also=[sibling(settings.output, kind) for kind in ("sft", "pairs")])
    stages = Stages(settings.output, settings.run, TeacherPool())
    try:
        params = SamplingParams(temperature=settings.temperature, max_tokens=settings.max_tokens, n=settings.samples, seed=settings.seed)
        rows = stages.run("samples", lambda t: CandidateGenerator(params, t.spec, "student"), inputs, student)
        prompted = assemble(inputs, candidates_from_rows(rows), include_given=False, dedup=False)
        if checker is not None:
            scored = {p.key: _consistency(p, checker) for p in prompted}
        else:
            judge = SamplingParams(temperature=settings.judge_temperature, max_tokens=settings.judge_max_tokens, seed=settings.seed)

            def make(t):
                return RateGenerator(judge, t.spec, templates["reward"], settings.aspects)

            grouped = ratings_by_key(stages.run("self-reward", make, rate_items(prompted, min_responses=1), student))
            scored = {p.key: _self_reward(p, grouped.get(p.key, {})) for p in prompted}
        refined = _refine(stages, settings, templates, prompted, _bests(prompted, scored, settings, checker), student) if settings.refine else {}
        student_name = stages.pool.get(student).spec
    finally:
        stages.pool.close()

    params = redact_data(settings.model_dump(mode="json", exclude={"lang", *PIPELINE_FIELDS}))
    provenance = Provenance(teacher=student_name, method=f"self-{settings.judge_by}", params=params, task="")
    sft, pairs, rejects = [], [], []
    for p in prompted:
        scores, details = scored[p.key]
        votes = settings.min_votes if checker is not None else None
        made = self_records(p, scores, details, settings.min_margin, provenance.model_copy(update={"task": p.key}), refined.get(p.key), votes)
        for kept, new in zip((sft, pairs, rejects), made):
            kept.extend(new)
    pairs_path = sibling(settings.output, "pairs")
    written = [
        ("SFT examples (best answers)", write_jsonl_atomic(settings.output, sft), settings.output),
        ("preference pairs (best over worst)", write_jsonl_atomic(pairs_path, pairs), pairs_path),
    ]
    return stages.finish(written, [r.model_dump(mode="json", exclude_none=True) for r in rejects], SelfResult)


def _consistency(p: Prompted, checker) -> tuple[dict[int, float], list[dict[str, Any]]]:
    scores, answers = consistency_scores(p.responses, checker)
    return scores, [{"answer": a} for a in answers]


def _self_reward(p: Prompted, ratings) -> tuple[dict[int, float], list[dict[str, Any]]]:
    scores = panel_scores(ratings)
    return scores, [{"ratings": ratings[i][0].rating} if ratings.get(i) else {} for i in range(len(p.responses))]


def _bests(prompted: list[Prompted], scored, settings: SelfSettings, checker) -> dict[str, int]:
    """The best sample of each input that will make an SFT example (so only those are refined)."""
    out = {}
    for p in prompted:
        scores = scored[p.key][0]
        i = best_index(scores)
        if i is not None and (checker is None or scores[i] >= settings.min_votes):
            out[p.key] = i
    return out


def _refine(stages: Stages, settings: SelfSettings, templates, prompted: list[Prompted], bests: dict[str, int], student: TeacherSettings) -> dict[str, dict[str, Any]]:
    """Critique each input's best answer, then rewrite it given that critique; {key: {critique, refined, finish_reason}}."""
    params = SamplingParams(temperature=0.0, max_tokens=settings.refine_max_tokens, seed=settings.seed)
    best = {
        p.key: (p, TemplateInput(key=p.key, prompt=p.input.prompt_text(), response=p.responses[bests[p.key]]))
        for p in prompted
        if p.key in bests
    }
    items = [(p.where, item) for p, item in best.values()]
    rows = stages.run("self-critique", lambda t: RawGenerator(params, t.spec, template=templates["critique"], keep_truncated=True), items, student)
    critiques = {r["meta"]["input"]["key"]: r["messages"][-1]["content"] for r in rows}
    items = [
        (p.where, TemplateInput(**item.model_dump(), critique=critiques[key]))
        for key, (p, item) in best.items()
        if key in critiques
    ]
    rows = stages.run("self-refine", lambda t: RawGenerator(params, t.spec, template=templates["refine"], keep_truncated=True), items, student)
    return {
        r["meta"]["input"]["key"]: {"critique": r["meta"]["input"]["critique"], "refined": r["messages"][-1]["content"], "finish_reason": r["meta"].get("finish_reason")}
        for r in rows
    }

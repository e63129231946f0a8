"""Self-Instruct: grow an instruction pool from seed tasks, then answer every new instruction.

Each round is one job (`OUT.work/round-N.jsonl`): `requests_per_round` requests, each
showing `demos` instructions sampled from the pool (a seeded RNG per round and request,
so a round is the same every run), asking for `per_request` new instructions as JSON.
Candidates pass the filters (length, leading punctuation, non-text tasks) and the
near-duplicate filter against the whole pool, in a fixed order, and join the pool.
Rounds stop at `target` new instructions or `max_rounds`; the new instructions are
written to `OUT.work/instructions.jsonl`. Then one job answers them all. Every response
is cached, so a rerun sends nothing and rebuilds the same pool and output.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from synth.filters.dedup import DedupSettings, Deduplicator, DedupStats
from synth.generators.expand.answer import NON_TEXT_WORDS, AnswerInput, InstructionAnswerGenerator, instruction_problem
from synth.generators.expand.self_instruct import Candidate, InstructionList, ProposeGenerator, RoundRequest
from synth.io import read_jsonl
from synth.job import RunSettings, run_job
from synth.layout import check_output, read_rows, stage_output, write_jsonl_atomic
from synth.pipelines.expand import ExpandResult, PoolItem, load_pool, stage_rejects, tagged, write_rejects
from synth.prompts import load_template
from synth.pipelines.stages import PipelineSettings
from synth.records import Reject
from synth.teachers import SamplingParams, build_teacher, resolve_teacher
from synth.teachers.base import Teacher


class SelfInstructSettings(PipelineSettings):
    """Settings of `distill expand self-instruct`; every default runs."""

    output: Path = Field(description="JSON Lines of SFT examples; OUT.rejects.jsonl and the OUT.work/ stages go beside it.")
    teacher: str = Field("embedded", description="The teacher spec: embedded, hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL, or a teacher .yaml file.")

    seeds: Path | None = Field(None, description="JSONL of seed tasks ({instruction, input?, output?} or Self-Instruct's format; default: the 175 shipped seeds).")
    target: int = Field(20, ge=1, description="New instructions to collect.")
    max_rounds: int = Field(10, ge=1, description="Stop after this many rounds even if short of the target.")
    requests_per_round: int = Field(4, ge=1, description="Requests per round, each with its own sample of demonstrations.")
    demos: int = Field(6, ge=1, description="Demonstrations shown per request (k).")
    machine_demos: int = Field(2, ge=0, description="How many of the demonstrations come from new instructions, once there are some.")
    per_request: int = Field(5, ge=1, le=50, description="New instructions asked for per request.")
    min_words: int = Field(3, ge=1, description="Shortest instruction kept, in words (a Chinese character counts as one).")
    max_words: int = Field(150, ge=1, description="Longest instruction kept, in words.")
    blocked_words: list[str] = Field(default_factory=lambda: list(NON_TEXT_WORDS), description="Instructions mentioning any of these (tasks a text model cannot do) are filtered out.")
    dedup: DedupSettings = Field(default_factory=DedupSettings, description="Near-duplicate filter against the whole pool (YAML only).")
    seed: int = Field(0, description="Seed of the demonstration samples and base seed of every teacher sample.")
    template: str = Field("expand/self_instruct", description="Template of instruction requests (method/name under prompts/, or a .jinja file); it gets `demos` and `count`.")
    answer_template: str = Field("expand/answer", description="Template of answer requests; it gets `instruction` and `input`.")
    lang: Literal["en", "zh"] = Field("en", description="Language of the prompts, and so of the data.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of instruction requests.")
    max_tokens: int = Field(1024, ge=1, description="Longest instruction-list reply.")
    answer_temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of answers.")
    answer_max_tokens: int = Field(1024, ge=1, description="Longest answer; longer ones are rejected as truncated.")
    logprobs: int | None = Field(None, ge=1, le=20, description="Store the teacher's top-K logprobs of each answer (soft labels).")

    @model_validator(mode="after")
    def _bounds(self) -> "SelfInstructSettings":
        if self.min_words > self.max_words:
            raise ValueError("min_words is larger than max_words")
        if self.machine_demos > self.demos:
            raise ValueError("machine_demos is larger than demos")
        return self


def round_requests(config: SelfInstructSettings, rnd: int, seeds: list[PoolItem], new: list[PoolItem]) -> list[RoundRequest]:
    """The requests of round `rnd`: demonstrations drawn with an RNG seeded by (seed, round, request)."""
    out = []
    for j in range(config.requests_per_round):
        rng = random.Random(f"{config.seed}:{rnd}:{j}")
        m = min(config.machine_demos, len(new))
        picks = rng.sample(new, m) + rng.sample(seeds, min(config.demos - m, len(seeds)))
        rng.shuffle(picks)
        demos = [{"instruction": p.instruction, "input": p.input} for p in picks]
        out.append(RoundRequest(round=rnd, request=j, count=config.per_request, demos=demos))
    return out


def output_kind(settings: dict[str, Any]) -> str | None:
    """The kind of record the output holds (a recipe checks it against what a later stage reads): SFT examples, the answer stage's."""
    return InstructionAnswerGenerator.emits


def run(settings: SelfInstructSettings) -> ExpandResult:
    """Rounds, filters and answers on one teacher, built here and closed at the end; reruns send nothing."""
    output = settings.output
    check_output(output, [settings.seeds] if settings.seeds else [], also=[stage_output(output, "instructions")])
    teacher = build_teacher(resolve_teacher(settings.teacher, settings.teacher_overrides))
    try:
        return _run(settings, output, teacher, settings.run)
    finally:
        asyncio.run(teacher.aclose())


def _run(config: SelfInstructSettings, output: Path, teacher: Teacher, settings: RunSettings) -> ExpandResult:
    seeds = load_pool(config.seeds)
    dedup = Deduplicator(config.dedup)
    for s in seeds:
        dedup.add(s.id, s.instruction)
    dedup.stats = DedupStats()  # count what the teacher proposes, not the seeds
    template = load_template(config.template, config.lang)
    new: list[PoolItem] = []
    rows: list[dict] = []
    stages = {}
    rnd = 0
    while len(new) < config.target and rnd < config.max_rounds:
        rnd += 1
        params = SamplingParams(temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed + 1000 * rnd,
                                json_schema=InstructionList.model_json_schema())  # fmt: skip
        requests = round_requests(config, rnd, seeds, new)
        out = stage_output(output, f"round-{rnd}")
        summary = run_job(lambda t: ProposeGenerator(params, t.spec, template), lambda: ((f"round {rnd} request {r.request}", r) for r in requests),
                          out, teacher, settings, label=f"self-instruct round {rnd}")  # fmt: skip
        stages[f"round-{rnd}"] = summary
        rows += stage_rejects(summary, f"round {rnd}")
        for c in _candidates(out):
            why = _screen(c, config, dedup, len(new))
            if why is None:
                new.append(PoolItem(id=c.id, instruction=c.instruction, input=c.input))
            else:
                rows.append(tagged(Reject(task=c.provenance.task, reason=why, input={"instruction": c.instruction, "input": c.input}, raw=[c.instruction]), f"round {rnd}"))
    write_jsonl_atomic(stage_output(output, "instructions"), [p.model_dump() for p in new])

    a_params = SamplingParams(temperature=config.answer_temperature, max_tokens=config.answer_max_tokens, seed=config.seed, logprobs=config.logprobs)
    a_template = load_template(config.answer_template, config.lang)
    items = [AnswerInput(id=p.id, instruction=p.instruction, input=p.input, meta={"method": "self-instruct"}) for p in new]
    answers = run_job(
        lambda t: InstructionAnswerGenerator(a_params, t.spec, a_template, method="self-instruct", tokenizer=t.tokenizer_name),
        lambda: ((f"instruction {i.id}", i) for i in items), output, teacher, settings, label="self-instruct answers",
    )  # fmt: skip
    stages["answers"] = answers
    # The job writes in completion order; the pool's order makes a rerun's file identical.
    order = {p.id: i for i, p in enumerate(new)}
    done = sorted(read_rows(output), key=lambda r: (order[r["meta"]["instruction_id"]], r["provenance"].get("sample") or 0))
    write_jsonl_atomic(output, done)
    rejected, reasons = write_rejects(output, rows + stage_rejects(answers, "answers"))
    return ExpandResult(output=output, rejects=answers.rejects, records=answers.records, rejected=rejected, reasons=reasons,
                        dedup=dedup.stats, stages=stages, instructions=len(new), rounds=rnd)  # fmt: skip


def _candidates(path: Path) -> list[Candidate]:
    """A round's candidates in a fixed order (the journal's order depends on which request finished first)."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    found = [c for _, c in read_jsonl(path, Candidate)]
    return sorted(found, key=lambda c: (c.request, c.provenance.sample or 0, c.index))


def _screen(c: Candidate, config: SelfInstructSettings, dedup: Deduplicator, have: int) -> str | None:
    """Why a candidate does not join the pool, or None (it was added to the dedup index)."""
    if have >= config.target:
        return "surplus: the target was already reached"
    problem = instruction_problem(c.instruction, config.min_words, config.max_words, config.blocked_words)
    if problem:
        return problem
    found = dedup.offer(c.id, c.instruction)
    return None if found is None else found.describe()

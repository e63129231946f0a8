"""Evol-Instruct: per round, evolve → eliminate (→ judge) → dedup → answer; then one output and one rejects file.

Every round's stages are jobs (`OUT.work/round-N-evolve.jsonl`, `-judge`, `-answer`),
cached and journaled, read back in a fixed order, so a rerun sends nothing and rebuilds
the same pool, output and rejects. The elimination rules are in synth/generators/expand/evol.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from synth.filters.dedup import DedupSettings, Deduplicator, DedupStats
from synth.generators.expand.answer import AnswerInput, InstructionAnswerGenerator
from synth.generators.expand.evol import (
    OPERATIONS,
    EquivalenceInput,
    EquivalenceJudge,
    EquivalenceVerdict,
    EvolInput,
    Evolved,
    EvolvedPrompt,
    EvolveGenerator,
    copies_wording,
    no_gain,
    pick_operation,
)
from synth.io import read_jsonl
from synth.job import JobSummary, RunSettings, run_job
from synth.layout import check_output, read_rows, rejects_path, stage_output, write_jsonl_atomic
from synth.pipelines.expand import ExpandResult, load_pool, stage_rejects, tagged, write_rejects
from synth.prompts import load_template
from synth.pipelines.stages import PipelineSettings
from synth.records import Reject
from synth.teachers import SamplingParams, build_teacher, resolve_teacher
from synth.teachers.base import Teacher


class EvolSettings(PipelineSettings):
    """Settings of `distill expand evol`; every default runs."""

    input: Path | None = Field(None, description="JSONL of instructions ({instruction, input?} or Self-Instruct's seed format; default: the shipped seed tasks).")
    limit: int | None = Field(None, ge=1, description="Evolve only the first N instructions.")
    output: Path = Field(description="JSON Lines of SFT examples; OUT.rejects.jsonl and the OUT.work/ stages go beside it.")
    teacher: str = Field("embedded", description="The teacher spec: embedded, hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL, or a teacher .yaml file.")

    rounds: int = Field(1, ge=1, le=10, description="Evolution rounds; survivors are evolved again in the next.")
    operations: list[str] = Field(default_factory=lambda: list(OPERATIONS), description="Operations drawn from: constraints, deepen, concretize, reasoning, complicate_input, breadth.")
    info_gain: Literal["heuristic", "teacher"] = Field("heuristic", description="How 'no information gain' is decided: a word-level heuristic, or by asking the teacher.")
    min_new_words: int = Field(3, ge=0, description="Heuristic: an in-depth evolution must add at least this many words the original lacks.")
    min_answer_words: int = Field(3, ge=1, description="Answers with fewer content words (not stop words or punctuation) are eliminated as too short.")
    refusal_words: int = Field(80, ge=1, description="An answer with a refusal phrase and fewer words than this is eliminated as a refusal.")
    dedup: DedupSettings = Field(default_factory=DedupSettings, description="Near-duplicate filter against everything accepted so far (YAML only).")
    seed: int = Field(0, description="Seed of the operation draws and base seed of every teacher sample.")
    templates: dict[str, str] = Field(default_factory=dict, description="Template per operation replacing expand/evol_<operation> (a name under prompts/ or a .jinja file; YAML only); each gets `prompt`.")
    answer_template: str = Field("expand/answer", description="Template of answer requests; it gets `instruction` and `input`.")
    judge_template: str = Field("expand/equal", description="Template of the information-gain question (info_gain=teacher); it gets `original` and `evolved`.")
    lang: Literal["en", "zh"] = Field("en", description="Language of the prompts, and so of the data.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of evolution requests.")
    max_tokens: int = Field(512, ge=1, description="Longest evolution reply.")
    judge_max_tokens: int = Field(16, ge=1, description="Longest judge reply (info_gain=teacher).")
    answer_temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of answers.")
    answer_max_tokens: int = Field(1024, ge=1, description="Longest answer; longer ones are eliminated as truncated.")
    logprobs: int | None = Field(None, ge=1, le=20, description="Store the teacher's top-K logprobs of each answer (soft labels).")

    @field_validator("operations")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [op for op in value if op not in OPERATIONS]
        if unknown or not value:
            raise ValueError(f"unknown operation(s) {unknown}; choose from {', '.join(OPERATIONS)}" if unknown else "give at least one operation")
        return value

    @field_validator("templates")
    @classmethod
    def _known_keys(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = [op for op in value if op not in OPERATIONS]
        if unknown:
            raise ValueError(f"templates for unknown operation(s) {unknown}; choose from {', '.join(OPERATIONS)}")
        return value


class _Node(BaseModel):
    """An instruction in the evolving pool, with the ids of its ancestors."""

    id: str
    prompt: str
    root: str
    lineage: list[str]


def output_kind(settings: dict[str, Any]) -> str | None:
    """The kind of record the output holds (a recipe checks it against what a later stage reads): SFT examples, the answer stage's."""
    return InstructionAnswerGenerator.emits


def run(settings: EvolSettings) -> ExpandResult:
    """Every round on one teacher, built here and closed at the end; reruns send nothing."""
    check_output(settings.output, [settings.input] if settings.input else [])
    teacher = build_teacher(resolve_teacher(settings.teacher, settings.teacher_overrides))
    try:
        return _Run(settings, settings.output, teacher, settings.run).run()
    finally:
        asyncio.run(teacher.aclose())


class _Run:
    def __init__(self, config: EvolSettings, output: Path, teacher: Teacher, settings: RunSettings):
        self.c, self.output, self.teacher, self.settings = config, output, teacher, settings
        self.dedup = Deduplicator(config.dedup)
        self.stages: dict[str, JobSummary] = {}
        self.rows: list[dict] = []
        self.records: list[dict] = []
        self.templates = {op: load_template(config.templates.get(op, f"expand/evol_{op}"), config.lang) for op in config.operations}

    def run(self) -> ExpandResult:
        pool = load_pool(self.c.input)[: self.c.limit]
        for item in pool:
            self.dedup.add(item.id, item.prompt_text())
        self.dedup.stats = DedupStats()  # count what the run proposes, not the inputs
        nodes = [_Node(id=p.id, prompt=p.prompt_text(), root=p.id, lineage=[p.id]) for p in pool]
        for rnd in range(1, self.c.rounds + 1):
            survivors = self.round(rnd, nodes)
            nodes = [survivors.get(n.id, n) for n in nodes]
        write_jsonl_atomic(self.output, self.records)
        rejected, reasons = write_rejects(self.output, self.rows)
        return ExpandResult(output=self.output, rejects=rejects_path(self.output), records=len(self.records), rejected=rejected,
                            reasons=reasons, dedup=self.dedup.stats, stages=self.stages, instructions=len(self.records), rounds=self.c.rounds)  # fmt: skip

    def job(self, name: str, make, items: list, label: str) -> Path:
        out = stage_output(self.output, name)
        self.stages[name] = summary = run_job(make, lambda: iter(items), out, self.teacher, self.settings, label=label)
        self.rows += stage_rejects(summary, name)
        return out

    def reject(self, e: Evolved, reason: str, stage: str) -> None:
        self.rows.append(tagged(Reject(task=e.provenance.task, reason=reason, input={"parent": e.parent, "operation": e.operation, "original": e.original},
                                       raw=[e.instruction]), stage))  # fmt: skip

    def round(self, rnd: int, nodes: list[_Node]) -> dict[str, _Node]:
        """One round; returns the surviving evolution of each parent that has one."""
        c = self.c
        params = SamplingParams(temperature=c.temperature, max_tokens=c.max_tokens, seed=c.seed + 1000 * rnd, json_schema=EvolvedPrompt.model_json_schema())
        items = [(f"round {rnd} {n.id}", EvolInput(id=n.id, prompt=n.prompt, operation=pick_operation(c.seed, rnd, n.id, c.operations), round=rnd, root=n.root))
                 for n in nodes]  # fmt: skip
        out = self.job(f"round-{rnd}-evolve", lambda t: EvolveGenerator(params, t.spec, self.templates),
                       items, f"evol round {rnd}")  # fmt: skip
        by_id = {n.id: n for n in nodes}
        order = {n.id: i for i, n in enumerate(nodes)}
        evolved = sorted(_read(out, Evolved), key=lambda e: (order[e.parent], e.provenance.sample or 0))
        stage = f"round-{rnd}"
        shingler = self.dedup.shingler
        pending: list[Evolved] = []
        for e in evolved:
            why = copies_wording(e.instruction) or no_gain(e.original, e.instruction, e.operation, c.min_new_words, shingler,
                                                           c.dedup.threshold, heuristic=c.info_gain == "heuristic")  # fmt: skip
            # Indexed as soon as it passes, so later evolutions are compared with it even if its answer fails.
            if why is None and (found := self.dedup.offer(e.id, e.instruction, ignore=by_id[e.parent].lineage)) is not None:
                why = found.describe()
            if why:
                self.reject(e, why, stage)
            elif e.parent not in {p.parent for p in pending}:  # one evolution per parent (n=1 normally)
                pending.append(e)
        if c.info_gain == "teacher" and pending:
            pending = self.judge(rnd, pending)
        a_params = SamplingParams(temperature=c.answer_temperature, max_tokens=c.answer_max_tokens, seed=c.seed + 1000 * rnd, logprobs=c.logprobs)
        a_template = load_template(c.answer_template, c.lang)
        answers = [(f"round {rnd} evolved {e.id}", AnswerInput(id=e.id, instruction=e.instruction,
                    meta={"method": "evol-instruct", "operation": e.operation, "round": rnd, "parent": e.parent, "root": e.root, "original": e.original}))
                   for e in pending]  # fmt: skip
        a_out = self.job(f"round-{rnd}-answer", lambda t: InstructionAnswerGenerator(a_params, t.spec, a_template, method="evol-instruct", min_words=c.min_answer_words,
                         refusal_words=c.refusal_words, tokenizer=t.tokenizer_name), answers, f"evol round {rnd} answers")  # fmt: skip
        answered = {}
        for row in read_rows(a_out):
            answered.setdefault(row["meta"]["instruction_id"], []).append(row)
        survivors: dict[str, _Node] = {}
        for e in pending:
            if e.id not in answered:
                continue  # its answer was eliminated (the answer stage's rejects say why)
            self.records += answered[e.id]
            parent = by_id[e.parent]
            survivors[e.parent] = _Node(id=e.id, prompt=e.instruction, root=e.root, lineage=[*parent.lineage, e.id])
        return survivors

    def judge(self, rnd: int, pending: list[Evolved]) -> list[Evolved]:
        """Ask the teacher whether each evolution equals its original; keep the unequal ones."""
        params = SamplingParams(temperature=0.0, max_tokens=self.c.judge_max_tokens, seed=self.c.seed)
        template = load_template(self.c.judge_template, self.c.lang)
        items = [(f"round {rnd} judge {e.id}", EquivalenceInput(id=e.id, original=e.original, evolved=e.instruction)) for e in pending]
        out = self.job(f"round-{rnd}-judge", lambda t: EquivalenceJudge(params, t.spec, template), items, f"evol round {rnd} judge")
        verdicts = {v.id: v for v in _read(out, EquivalenceVerdict)}
        kept = []
        for e in pending:
            v = verdicts.get(e.id)
            if v is not None and v.equal:
                self.reject(e, "no information gain: the teacher judged it equal to the original", f"round-{rnd}")
            elif v is not None:
                kept.append(e)
        return kept


def _read(path: Path, model: type[BaseModel]) -> list:
    if not path.is_file() or path.stat().st_size == 0:
        return []
    return [item for _, item in read_jsonl(path, model)]

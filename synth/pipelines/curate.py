"""Curation end to end: (grow a tree,) cells, questions, dedup, answers, rejects, coverage.

Stages are jobs into `OUT.work/` (`tree-N.jsonl`, `questions.jsonl`); the answers job
writes the output itself. A grown tree goes beside the output as `OUT.tree.yaml`, the
coverage report as `OUT.coverage.json` and `OUT.coverage.md`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from synth.generators.curate.stages import (
    CellInput,
    QuestionAnswerGenerator,
    QuestionGenerator,
    QuestionInput,
    QuestionList,
    QuestionRecord,
    SubtopicGenerator,
    SubtopicList,
    SubtopicsRecord,
    TopicNode,
    request_schema,
)
from synth.generators.curate.taxonomy import (
    Cell,
    Taxonomy,
    all_cells,
    load_taxonomy,
    sample_cells,
    taxonomy_from_tree,
    write_taxonomy,
)
from synth.io import read_jsonl
from synth.job import JobSummary, RunSettings, run_job
from synth.layout import check_output, read_rows, rejects_path, stage_output, write_jsonl_atomic, write_text_atomic
from synth.pipelines.curate_coverage import beside, write_coverage
from synth.prompts import load_template
from synth.pipelines.stages import PipelineSettings
from synth.records import Reject
from synth.teachers import SamplingParams, build_teacher, resolve_teacher
from synth.teachers.base import Teacher

_DEFAULT_TASKS = {"en": ["open question", "worked problem", "explanation"], "zh": ["开放性问题", "计算题", "概念解释"]}
_DEFAULT_LEVELS = {"en": ["easy", "medium", "hard"], "zh": ["简单", "中等", "困难"]}


class CurateSettings(PipelineSettings):
    """Settings of `distill curate`; every default runs."""

    output: Path = Field(description="JSON Lines of SFT examples; rejects, coverage and tree go beside it.")
    teacher: str = Field("embedded", description="The teacher spec: embedded, hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL, or a teacher .yaml file.")

    taxonomy: str | None = Field(None, description="Taxonomy YAML file, or the name of a shipped one (math_en, zh_general).")
    root_topic: str | None = Field(None, description="Grow a topic tree from this root topic instead of reading a taxonomy.")
    depth: int = Field(2, ge=1, le=4, description="Levels of subtopics grown under the root topic.")
    breadth: int = Field(3, ge=1, le=20, description="Subtopics asked for per topic when growing the tree.")
    task_types: list[str] | None = Field(None, description="Task types of a grown tree (default: open question, worked problem, explanation).")
    difficulties: list[str] | None = Field(None, description="Difficulty levels of a grown tree (default: easy, medium, hard).")
    knowledge_points: bool = Field(True, description="One cell per knowledge point where the taxonomy lists them.")
    per_cell: int = Field(2, ge=1, le=50, description="Questions asked for per cell.")
    max_cells: int | None = Field(None, ge=1, description="Use a seeded sample of at most this many cells (default: every cell).")
    seed: int = Field(0, description="Seed of the cell sample, and base seed of every teacher sample.")
    lang: Literal["en", "zh"] = Field("en", description="Language of the prompts, and so of the data.")
    instruction: str | None = Field(None, description="Extra instruction put before every subtopic and question request.")
    answer_instruction: str | None = Field(None, description="Instruction replacing the answer template's own.")
    prompt_form: Literal["question", "teacher"] = Field(
        "question", description="Record prompts hold the bare question, or the whole chat the teacher answered."
    )
    tree_temperature: float = Field(0.7, ge=0, description="Sampling temperature of subtopic requests.")
    tree_max_tokens: int = Field(256, ge=1, description="Longest subtopic reply.")
    question_temperature: float = Field(0.9, ge=0, description="Sampling temperature of question requests.")
    question_max_tokens: int = Field(512, ge=1, description="Longest question-list reply.")
    answer_temperature: float = Field(0.7, ge=0, description="Sampling temperature of answers.")
    answer_max_tokens: int = Field(1024, ge=1, description="Longest answer; longer ones are rejected as truncated.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Store the teacher's top-K logprobs of each answer (soft labels).")

    @field_validator("root_topic", "taxonomy")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value.strip() if value else value

    @model_validator(mode="after")
    def _one_source(self) -> "CurateSettings":
        if (self.taxonomy is None) == (self.root_topic is None):
            raise ValueError("give either taxonomy (--taxonomy FILE) or root_topic (--root-topic TOPIC), not both and not neither")
        if self.taxonomy is not None and (self.task_types or self.difficulties):
            raise ValueError("task_types and difficulties are for root_topic; a taxonomy lists its own")
        return self


@dataclass
class CurateResult:
    """What a curation run wrote, and each stage's job summary."""

    output: Path
    rejects: Path
    coverage_json: Path
    coverage_md: Path
    tree: Path | None
    cells: int
    cells_total: int
    questions: int
    duplicates: int
    records: int
    rejected: int
    empty_cells: int
    stages: dict[str, JobSummary] = field(default_factory=dict)


def output_kind(settings: dict[str, Any]) -> str | None:
    """The kind of record the output holds (a recipe checks it against what a later stage reads): SFT examples, the answer stage's."""
    return QuestionAnswerGenerator.emits


def run(settings: CurateSettings) -> CurateResult:
    """Every stage on one teacher, built here and closed at the end; reruns send nothing."""
    output = settings.output
    tree = [beside(output, ".tree.yaml")] if settings.root_topic is not None else []
    inputs = [settings.taxonomy] if settings.taxonomy is not None else []
    check_output(output, inputs, also=[*tree, beside(output, ".coverage.json"), beside(output, ".coverage.md")])
    teacher = build_teacher(resolve_teacher(settings.teacher, settings.teacher_overrides))
    try:
        return _run(settings, output, teacher, settings.run)
    finally:
        asyncio.run(teacher.aclose())


def _run(config: CurateSettings, output: Path, teacher: Teacher, settings: RunSettings) -> CurateResult:
    stages: dict[str, JobSummary] = {}
    tree = None
    if config.taxonomy is not None:
        taxonomy = load_taxonomy(config.taxonomy)
    else:
        taxonomy = grow_tree(config, output, teacher, settings, stages)
        tree = write_taxonomy(taxonomy, beside(output, ".tree.yaml"))
    every = all_cells(taxonomy, config.knowledge_points)
    cells = sample_cells(every, config.max_cells, config.seed)

    # Stage: questions for every cell.
    q_template = load_template("curate/questions", config.lang)
    q_params = SamplingParams(
        temperature=config.question_temperature, max_tokens=config.question_max_tokens, seed=config.seed,
        json_schema=request_schema(QuestionList),
    )  # fmt: skip
    q_out = stage_output(output, "questions")

    def cell_items():
        for i, cell in enumerate(cells, start=1):
            yield f"cell {i} ({cell.label})", _cell_input(cell, config)

    stages["questions"] = run_job(
        lambda t: QuestionGenerator(q_params, t.spec, q_template), cell_items, q_out, teacher, settings, label="curate questions"
    )
    order = {cell.id: i for i, cell in enumerate(cells)}
    questions = [q for q in _read_stage(q_out, QuestionRecord) if q.meta["cell"] in order]
    # Sorted so "the first copy" is the same whatever order the teacher finished in.
    questions.sort(key=lambda q: (order[q.meta["cell"]], q.provenance.sample or 0, q.index))
    kept, duplicates = dedup_questions(questions)

    # Stage: answers for every question kept.
    a_template = load_template("curate/answer", config.lang)
    a_params = SamplingParams(
        temperature=config.answer_temperature, max_tokens=config.answer_max_tokens, seed=config.seed, logprobs=config.logprobs
    )

    def question_items():
        for q in kept:
            yield f"question {q.id} ({q.question[:40]!r})", QuestionInput(question=q.question, meta={**q.meta, "question_index": q.index})

    def make_answerer(t: Teacher) -> QuestionAnswerGenerator:
        return QuestionAnswerGenerator(
            a_params, t.spec, a_template, instruction=config.answer_instruction, tokenizer=t.tokenizer_name, prompt_form=config.prompt_form
        )

    answers = run_job(make_answerer, question_items, output, teacher, settings, label="curate answers")
    stages["answers"] = answers
    # Teachers finish in any order; sorted, the same job always writes the same bytes.
    _sort_lines(output, lambda r: (order.get(r["meta"].get("cell"), -1), r["meta"].get("question_index", 0), r["provenance"].get("sample") or 0, r["id"]))

    rejected = _merge_rejects(output, stages, duplicates)
    records = [r["meta"] for r in read_rows(output)]
    coverage_json, coverage_md, empty = write_coverage(output, cells, len(every), kept, records, rejected, config)
    return CurateResult(
        output=output, rejects=rejects_path(output), coverage_json=coverage_json, coverage_md=coverage_md, tree=tree,
        cells=len(cells), cells_total=len(every), questions=len(kept), duplicates=len(duplicates),
        records=answers.records, rejected=rejected, empty_cells=empty, stages=stages,
    )  # fmt: skip


def grow_tree(config: CurateSettings, output: Path, teacher: Teacher, settings: RunSettings, stages: dict[str, JobSummary]) -> Taxonomy:
    """Grow the topic tree level by level from `config.root_topic`; a topic whose reply fails stays a leaf."""
    template = load_template("curate/subtopics", config.lang)
    params = SamplingParams(
        temperature=config.tree_temperature, max_tokens=config.tree_max_tokens, seed=config.seed,
        json_schema=request_schema(SubtopicList),
    )  # fmt: skip
    root = config.root_topic
    children: dict[tuple[str, ...], list[str]] = {}
    level: list[tuple[str, ...]] = [(root,)]
    for depth in range(1, config.depth + 1):
        out = stage_output(output, f"tree-{depth}")

        def nodes(level=level):
            for path in level:
                yield f"topic {' > '.join(path)}", TopicNode(path=list(path), breadth=config.breadth, instruction=config.instruction)

        stages[f"tree-{depth}"] = run_job(
            lambda t: SubtopicGenerator(params, t.spec, template), nodes, out, teacher, settings, label=f"curate tree level {depth}"
        )
        for rec in _read_stage(out, SubtopicsRecord):
            children[tuple(rec.path)] = rec.subtopics
        level = [(*path, name) for path in level for name in children.get(path, [])]
        if not level:
            break
    description = f"grown from {root!r} by {teacher.spec} (depth {config.depth}, breadth {config.breadth}, seed {config.seed})"
    tasks = config.task_types or _DEFAULT_TASKS[config.lang]
    levels = config.difficulties or _DEFAULT_LEVELS[config.lang]
    return taxonomy_from_tree(root, children, tasks, levels, description)


def dedup_questions(questions: list[QuestionRecord]) -> tuple[list[QuestionRecord], list[Reject]]:
    """Keep the first of each question (compared case- and space-insensitively); the rest become rejects."""
    first: dict[str, QuestionRecord] = {}
    kept, rejects = [], []
    for q in questions:
        key = " ".join(q.question.casefold().split())
        if key in first:
            same = first[key]
            where = "the same cell" if same.meta["cell"] == q.meta["cell"] else " > ".join(same.meta["topic"])
            rejects.append(Reject(
                task=q.provenance.task, reason=f"duplicate question: same as question {same.id} ({where})",
                input={"question": q.question, "meta": q.meta}, raw=[q.question],
            ))  # fmt: skip
        else:
            first[key] = q
            kept.append(q)
    return kept, rejects


def _cell_input(cell: Cell, config: CurateSettings) -> CellInput:
    return CellInput(
        cell=cell.id, topic=list(cell.topic), topic_description=cell.topic_description,
        task_type=cell.task_type.name, task_description=cell.task_type.description,
        difficulty=cell.difficulty.name, difficulty_description=cell.difficulty.description,
        knowledge_point=cell.knowledge_point, count=config.per_cell, instruction=config.instruction,
    )  # fmt: skip


def _read_stage(path: Path, model: type[BaseModel]) -> list:
    if not path.is_file() or path.stat().st_size == 0:
        return []
    return [item for _, item in read_jsonl(path, model)]


def _sort_lines(path: Path, key) -> None:
    """Rewrite a JSON Lines file with its lines (kept byte for byte) in `key` order."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.sort(key=lambda line: key(json.loads(line)))
    write_text_atomic(path, "".join(lines))


def _merge_rejects(output: Path, stages: dict[str, JobSummary], duplicates: list[Reject]) -> int:
    """One rejects file for the whole run, stage by stage, each reason prefixed with its stage."""
    rows = []
    for name, summary in stages.items():
        stage_rows = [{**row, "reason": f"{name}: {row['reason']}"} for row in read_rows(summary.rejects)]
        rows.extend(sorted(stage_rows, key=lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)))
        if name == "questions":
            rows.extend({**r.model_dump(mode="json", exclude_none=True), "reason": f"dedup: {r.reason}"} for r in duplicates)
    return write_jsonl_atomic(rejects_path(output), rows)

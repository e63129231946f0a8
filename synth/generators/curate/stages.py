"""Curation from meta-information: the subtopic, question and answer generators and the parsers they share.

Stages: grow a topic tree (optional) → questions x ~ p(x | I ⊕ m) for each cell of
meta-information m → answers y ~ p(y | I ⊕ x). The pipeline is synth/pipelines/curate.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.filters.refusal import refusal
from synth.generators.answer import AnswerGenerator
from synth.generators.base import Generator, Outcome, Task
from synth.generators.curate.taxonomy import normalize_name
from synth.records import Message, Provenance, Reject, stable_id
from synth.structured import ListReply, parse_model
from synth.teachers.base import ChatRequest, ChatResponse, Completion

_NUMBERING = re.compile(r"^\s*(?:\d{1,3}[.)、:]|[-*•])\s+")
_ITEM_KEYS = ("question", "name", "topic", "subtopic", "text", "title")
# The templates' format examples are placeholders like "<question 1>": a weak teacher copies them.
_PLACEHOLDER = re.compile(r"^(<[^<>]*>|\.\.\.|…)$")


class _TextListReply(ListReply):
    """A list of strings; objects inside it may wrap the string, and placeholders and numbering are dropped."""

    @classmethod
    def list_items(cls, items: list[Any]) -> list[Any]:
        """The strings, unwrapped, without numbering; placeholders and non-strings dropped."""
        out = []
        for item in items:
            if isinstance(item, dict):
                item = next((item[k] for k in _ITEM_KEYS if isinstance(item.get(k), str)), None)
            if isinstance(item, str) and not _PLACEHOLDER.match(item.strip()):
                out.append(_NUMBERING.sub("", item).strip())
        return out


class QuestionList(_TextListReply):
    """The teacher's reply to a question request: `{"questions": ["...", ...]}`."""

    list_key = "questions"

    questions: list[str] = Field(description="New, self-contained questions, one string each.")


class SubtopicList(_TextListReply):
    """The teacher's reply to a subtopic request: `{"subtopics": ["...", ...]}`."""

    list_key = "subtopics"

    subtopics: list[str] = Field(description="Short names of distinct, narrower subtopics.")


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema as a teacher sees it: without the class docstring, which is written for programmers."""
    schema = model.model_json_schema()
    schema.pop("description", None)
    return schema


def _why_unparsable(text: str, finish_reason: str | None, why: str) -> str:
    if finish_reason == "length" and why == "no JSON found in the reply":
        return "truncated: hit max_tokens before the JSON was complete"
    if not text.strip():
        return "empty: the reply is empty"
    # Only a reply without JSON can be a refusal: one with JSON tried to answer.
    if why == "no JSON found in the reply" and refusal(text):
        return "refusal: the teacher declined"
    return f"unparsable: {why}"


def parse_questions(text: str, finish_reason: str | None = None) -> tuple[list[str] | None, str | None]:
    """(questions, None) or (None, reason) for one reply; reasons start with unparsable/truncated/refusal/empty."""
    parsed, why = parse_model(text, QuestionList)
    if parsed is None:
        return None, _why_unparsable(text, finish_reason, why)
    questions = [q for q in parsed.questions if q]
    if not questions:
        return None, "empty: the reply lists no questions"
    return questions, None


def parse_subtopics(text: str, finish_reason: str | None, path: list[str]) -> tuple[list[str] | None, str | None]:
    """(distinct subtopic names, None) or (None, reason); drops repeats and names of the topic's own path."""
    parsed, why = parse_model(text, SubtopicList)
    if parsed is None:
        return None, _why_unparsable(text, finish_reason, why)
    seen = {normalize_name(p) for p in path}
    names = []
    for name in parsed.subtopics:
        key = normalize_name(name)
        # A sentence is not a topic name: the model answered the wrong question.
        if key and key not in seen and len(name) <= 120:
            seen.add(key)
            names.append(name.strip())
    if not names:
        return None, "empty: no new, distinct subtopic names in the reply"
    return names, None


def _reject(task: Task, reason: str, sample: int, raw: str) -> Reject:
    return Reject(task=task.id, reason=f"sample {sample}: {reason}", input=task.input.model_dump(mode="json", exclude_none=True), raw=[raw])


class _JsonListGenerator(Generator):
    """Shared parse loop: each sample becomes records, a resample (not final) or a reject (final)."""

    def records_of(self, task: Task, sample: int, text: str, finish_reason: str | None) -> tuple[list[BaseModel], str | None]:
        """Records for one sample, or ([], reason)."""
        raise NotImplementedError

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Unparsable samples are resampled once, then rejected with the raw text."""
        out = Outcome()
        for sample, completion in self.answers(request, response):
            records, why = self.records_of(task, sample, completion.text, completion.finish_reason)
            if why is None:
                out.records.extend(records)
            else:
                out.bad_sample(_reject(task, why, sample, completion.text), retry=not final)
        return out


class TopicNode(BaseModel):
    """Input of the tree stage: a topic (its path from the root) to split into subtopics."""

    model_config = ConfigDict(extra="forbid")

    path: list[str] = Field(min_length=1)
    breadth: int = Field(ge=1)
    instruction: str | None = None


class SubtopicsRecord(BaseModel):
    """Output of the tree stage: the subtopics proposed for one topic."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["subtopics"] = "subtopics"
    id: str
    path: list[str]
    subtopics: list[str]
    provenance: Provenance


class SubtopicGenerator(_JsonListGenerator):
    """Asks for `breadth` subtopics of one topic, as JSON."""

    method = "curate-tree"
    input_model = TopicNode
    emits = "subtopics"

    def messages(self, item: TopicNode, where: str) -> list[Message]:
        """The subtopic request for one topic."""
        text = self.template.render(where, topic=item.path[-1], path=item.path, breadth=item.breadth, instruction=item.instruction)
        return [Message(role="user", content=text)]

    def records_of(self, task, sample, text, finish_reason):
        """One SubtopicsRecord with at most `breadth` distinct names."""
        names, why = parse_subtopics(text, finish_reason, task.input.path)
        if names is None:
            return [], why
        rec = SubtopicsRecord(id=stable_id(task.id, sample), path=task.input.path, subtopics=names[: task.input.breadth], provenance=self.provenance(task, sample))
        return [rec], None


class CellInput(BaseModel):
    """Input of the question stage: one cell of meta-information and how many questions to ask for."""

    model_config = ConfigDict(extra="forbid")

    cell: str
    topic: list[str]
    topic_description: str | None = None
    task_type: str
    task_description: str | None = None
    difficulty: str
    difficulty_description: str | None = None
    knowledge_point: str | None = None
    count: int = Field(ge=1)
    instruction: str | None = None

    def meta(self) -> dict[str, Any]:
        """The cell's meta-information as records carry it."""
        return {"cell": self.cell, "topic": self.topic, "task_type": self.task_type, "difficulty": self.difficulty, "knowledge_point": self.knowledge_point}


class QuestionRecord(BaseModel):
    """Output of the question stage: one question and the cell it was written for."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["question"] = "question"
    id: str
    question: str
    index: int = Field(description="Position in the teacher's list.")
    meta: dict[str, Any]
    provenance: Provenance


class QuestionGenerator(_JsonListGenerator):
    """Asks for `count` questions fitting one cell, as JSON."""

    method = "curate-questions"
    input_model = CellInput
    emits = "question"

    def messages(self, item: CellInput, where: str) -> list[Message]:
        """The question request for one cell."""
        fields = item.model_dump()
        return [Message(role="user", content=self.template.render(where, **fields))]

    def records_of(self, task, sample, text, finish_reason):
        """The first `count` questions, each its own record."""
        questions, why = parse_questions(text, finish_reason)
        if questions is None:
            return [], why
        prov = self.provenance(task, sample)
        meta = task.input.meta()
        return [
            QuestionRecord(id=stable_id(task.id, sample, i), question=q, index=i, meta=meta, provenance=prov)
            for i, q in enumerate(questions[: task.input.count])
        ], None


class QuestionInput(BaseModel):
    """Input of the answer stage: a question kept after dedup, with its cell's meta-information."""

    model_config = ConfigDict(extra="forbid")

    question: str
    meta: dict[str, Any]


class QuestionAnswerGenerator(AnswerGenerator):
    """Answers each curated question; records are TRL prompt/completion chats with the cell in meta."""

    method = "curate"
    input_model = QuestionInput

    def __init__(self, params, teacher_name, template=None, *, instruction: str | None = None, tokenizer: str | None = None, prompt_form: str = "question"):
        super().__init__(params, teacher_name, template, tokenizer=tokenizer)
        self.instruction = instruction
        self.prompt_form = prompt_form

    def task_id(self, item: BaseModel) -> str:
        """The base id, with the instruction and prompt form folded in when they are not the defaults."""
        base = super().task_id(item)
        if self.instruction is None and self.prompt_form == "question":
            return base
        return stable_id(base, self.instruction, self.prompt_form)

    def messages(self, item: QuestionInput, where: str) -> list[Message]:
        """The answer request: the instruction (the template's own unless one is given) and the question."""
        return [Message(role="user", content=self.template.render(where, question=item.question, instruction=self.instruction))]

    def problem(self, completion: Completion) -> str | None:
        """Truncated or empty; any other answer is kept."""
        if completion.finish_reason == "length":
            return "truncated answer: hit max_tokens"
        if not completion.text.strip():
            return "empty answer"
        return None

    def reject(self, task: Task, sample: int, problem: str, raw: str) -> Reject:
        """`sample N: <problem>`."""
        return _reject(task, problem, sample, raw)

    def prompt(self, task: Task, request: ChatRequest) -> list[Message]:
        """The question alone (the default form), or the whole request with its instruction."""
        return [Message(role="user", content=task.input.question)] if self.prompt_form == "question" else list(request.messages)

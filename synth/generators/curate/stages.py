"""Curation from meta-information: the three generators and the parsers they share.

Stages: grow a topic tree (optional) → questions x ~ p(x | I ⊕ m) for each cell of
meta-information m → answers y ~ p(y | I ⊕ x). The pipeline is synth/pipelines/curate.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.generators.base import Generator, Outcome, Task
from synth.generators.curate.taxonomy import normalize_name
from synth.generators.raw import soft_labels_of
from synth.records import Provenance, Reject, SFTExample, stable_id
from synth.structured import parse_model
from synth.teachers.base import ChatRequest, ChatResponse, Message

# Phrases a reply opens with when the model declines; only consulted when it holds no JSON.
_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry|i cannot|i can'?t|i am unable|i'm unable|as an ai|抱歉|对不起|很抱歉|我不能|我无法)", re.I)
_NUMBERING = re.compile(r"^\s*(?:\d{1,3}[.)、:]|[-*•])\s+")
_ITEM_KEYS = ("question", "name", "topic", "subtopic", "text", "title")
# The templates' format examples are placeholders like "<question 1>": a weak teacher copies them.
_PLACEHOLDER = re.compile(r"^(<[^<>]*>|\.\.\.|…)$")


def _items_of(value: Any, key: str) -> Any:
    """Lenient shapes: a bare list is the list; objects inside it may wrap the string."""
    if isinstance(value, list):
        value = {key: value}
    if isinstance(value, dict) and isinstance(value.get(key), list):
        items = []
        for item in value[key]:
            if isinstance(item, dict):
                item = next((item[k] for k in _ITEM_KEYS if isinstance(item.get(k), str)), None)
            if isinstance(item, str) and not _PLACEHOLDER.match(item.strip()):
                items.append(_NUMBERING.sub("", item).strip())
        value = {**value, key: items}
    return value


class QuestionList(BaseModel):
    """The teacher's reply to a question request: `{"questions": ["...", ...]}`."""

    model_config = ConfigDict(extra="ignore")

    questions: list[str] = Field(description="New, self-contained questions, one string each.")

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, value: Any) -> Any:
        return _items_of(value, "questions")


class SubtopicList(BaseModel):
    """The teacher's reply to a subtopic request: `{"subtopics": ["...", ...]}`."""

    model_config = ConfigDict(extra="ignore")

    subtopics: list[str] = Field(description="Short names of distinct, narrower subtopics.")

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, value: Any) -> Any:
        return _items_of(value, "subtopics")


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
    if why == "no JSON found in the reply" and _REFUSAL.match(text):
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
        for i, completion in enumerate(response.completions):
            sample = request.sample_offset + i
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


class AnswerGenerator(Generator):
    """Answers each question; records are TRL prompt/completion chats with the cell in meta."""

    method = "curate"
    input_model = QuestionInput

    def __init__(self, params, teacher_name, template=None, *, instruction: str | None = None, tokenizer: str | None = None, prompt_form: str = "question"):
        super().__init__(params, teacher_name, template)
        self.instruction = instruction
        self.tokenizer = tokenizer
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

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Truncated answers are rejected; empty ones resampled once, then rejected."""
        out = Outcome()
        item: QuestionInput = task.input
        prompt = [Message(role="user", content=item.question)] if self.prompt_form == "question" else list(request.messages)
        for i, completion in enumerate(response.completions):
            sample = request.sample_offset + i
            if completion.finish_reason == "length":
                out.rejects.append(_reject(task, "truncated answer: hit max_tokens", sample, completion.text))
            elif not completion.text.strip():
                out.bad_sample(_reject(task, "empty answer", sample, completion.text), retry=not final)
            else:
                out.records.append(
                    SFTExample(
                        id=stable_id(task.id, sample),
                        prompt=prompt,
                        # Unstripped, so it stays aligned with the soft labels' tokens.
                        completion=[Message(role="assistant", content=completion.text)],
                        soft_labels=soft_labels_of(completion, self.tokenizer),
                        meta={**item.meta, "finish_reason": completion.finish_reason},
                        provenance=self.provenance(task, sample),
                    )
                )
        return out


"""The Generator contract: no I/O and no retries inside; the runner owns those."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Literal

from pydantic import AfterValidator, BaseModel

from synth.records import Message, Provenance, Reject, SFTExample, stable_id
from synth.teachers.base import ChatRequest, ChatResponse, Completion, SamplingParams
from synth.teachers.reasoning import inline

#: What a record does with a reasoning teacher's thinking: keep it in its own field, drop it, or
#: write it into the answer as `<think>…</think>` (R1-distill style, so a student learns to reason).
ReasoningMode = Literal["keep", "drop", "inline"]


def _has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("empty or only whitespace: there is nothing to send")
    return value


#: A string from an input file that goes to the teacher: it must hold some text.
PromptText = Annotated[str, AfterValidator(_has_text)]


class Turn(Message):
    """A chat turn read from an input file: like Message, but its content must hold text."""

    content: PromptText


def check_chat(messages: list[Turn] | None) -> list[Turn] | None:
    """A chat worth paying for: at least one turn, and a user turn among them (use as a field validator)."""
    if messages is not None:
        if not messages:
            raise ValueError("is empty: a chat needs at least one user turn")
        if not any(m.role == "user" for m in messages):
            raise ValueError("has no user turn: there is nothing for the teacher to answer")
    return messages


@dataclass
class Outcome:
    """What one response became: records, rejects, and how many fresh samples to ask for instead of bad ones."""

    records: list[BaseModel] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    resample: int = 0

    def bad_sample(self, reject: Reject, retry: bool) -> None:
        """A sample that made no record: ask for a fresh one in its place when `retry`, else keep the reject."""
        if retry:
            self.resample += 1
        else:
            self.rejects.append(reject)


@dataclass
class Task:
    """One unit of work: an input, its request and its stable id."""

    id: str
    request: ChatRequest
    input: Any
    where: str = ""


class Generator(abc.ABC):
    """Declares its input model, template and parameters; builds messages; parses responses."""

    #: Name written into provenance and record ids.
    method: str = ""
    #: Pydantic model each input line is validated against before any work starts.
    input_model: type[BaseModel]
    #: The `kind` of the records `parse` makes: records.py's "sft", "preference" or "critique", or a stage record's own.
    emits: str
    #: What SFT records do with the teacher's reasoning; the job sets it from --reasoning.
    reasoning: ReasoningMode = "keep"
    #: Ask once more in place of an empty answer (methods that vote over a fixed set of samples do not).
    resample_empty: bool = False

    def __init__(self, params: SamplingParams, teacher_name: str, template=None):
        self.params = params
        self.teacher_name = teacher_name
        self.template = template
        # Computed once: every record of the job carries them.
        self._params_json = params.model_dump(mode="json", exclude_none=True)
        self._template_hash = template.hash if template else None

    @abc.abstractmethod
    def messages(self, item: BaseModel, where: str) -> list[Message]:
        """The chat sent to the teacher for one input; `where` (file:line) names it in errors."""

    @abc.abstractmethod
    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Turn a response's answers (see `answers`) into records; when not `final`, may ask for fresh samples instead of unparsable ones."""

    def sample_name(self, sample: int) -> str:
        """How a reject names one sample: "sample 3"."""
        return f"sample {sample}"

    def answers(self, request: ChatRequest, response: ChatResponse) -> Iterator[tuple[int, Completion]]:
        """(sample index, completion) of each completion that is an answer: what `parse` reads."""
        for i, completion in enumerate(response.completions):
            if completion.not_an_answer() is None:
                yield request.sample_offset + i, completion

    def outcome(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """What a response became: a reject for each sample that is no answer (refused, filtered, empty), `parse` for the rest.

        A refusal is kept as a reject with its text and is not asked again in this run (it is cached
        as what it is: `--refresh` asks again); an empty answer is, once, where the method allows it.
        """
        out = Outcome()
        for i, completion in enumerate(response.completions):
            why = completion.not_an_answer()
            if why is None:
                continue
            sample = request.sample_offset + i
            raw = [text for text in (completion.refusal, completion.text, completion.reasoning) if text]
            reject = Reject(task=task.id, reason=f"{self.sample_name(sample)}: {why}", input=_dump(task.input), raw=raw)
            out.bad_sample(reject, retry=self.resample_empty and not final and why.startswith("empty"))
        parsed = self.parse(task, request, response, final)
        out.records = [with_reasoning(r, self.reasoning) for r in parsed.records]
        out.rejects += parsed.rejects
        out.resample += parsed.resample
        return out

    def task_id(self, item: BaseModel) -> str:
        """Stable hash of (input, method, template, parameters)."""
        return stable_id(item.model_dump(mode="json"), self.method, self._template_hash, self._params_json)

    def make_task(self, item: BaseModel, where: str) -> Task:
        """Build the task for one input."""
        request = ChatRequest(messages=self.messages(item, where), params=self.params)
        return Task(id=self.task_id(item), request=request, input=item, where=where)

    def provenance(self, task: Task, sample: int | None) -> Provenance:
        """Provenance for a record made from `task`."""
        return Provenance(
            teacher=self.teacher_name,
            method=self.method,
            template=self.template.name if self.template else None,
            template_hash=self._template_hash,
            params=self._params_json,
            task=task.id,
            sample=sample,
        )


def with_reasoning(record: BaseModel, mode: ReasoningMode) -> BaseModel:
    """An SFT record as `mode` wants its reasoning: kept in its field, dropped, or inlined into the answer."""
    if not isinstance(record, SFTExample) or record.reasoning is None or mode == "keep":
        return record
    if mode == "drop":
        return record.model_copy(update={"reasoning": None})
    update: dict[str, Any] = {"reasoning": None, "soft_labels": None}  # the teacher's logprobs cover the answer alone
    if record.messages is not None:
        *head, last = record.messages
        update["messages"] = [*head, last.model_copy(update={"content": inline(record.reasoning, last.content)})]
    elif isinstance(record.completion, str):
        update["completion"] = inline(record.reasoning, record.completion)
    else:
        *head, last = record.completion
        update["completion"] = [*head, last.model_copy(update={"content": inline(record.reasoning, last.content)})]
    return record.model_copy(update=update)


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value

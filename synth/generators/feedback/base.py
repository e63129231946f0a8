"""Feedback, shared parts: the input, candidate responses, judgments and the judge parse loop.

A feedback job runs in stages: candidate responses are generated (or read from the
input), then each judge of the panel judges them in its own job (one `Judgment`
record per parsed reply), then a pure aggregation step turns the judgments into
preference pairs, critiques and SFT examples. The modes live in `rate`,
`pairwise` and `critique`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synth.filters.refusal import refusal
from synth.generators.base import Generator, Outcome, PromptText, Task, Turn, check_chat
from synth.records import Message, Provenance, Reject, SFTExample, Text, stable_id
from synth.structured import parse_model
from synth.teachers.base import ChatRequest, ChatResponse, Completion


class FeedbackInput(BaseModel):
    """A prompt (`prompt` or `messages`, optional `system`), optionally with candidate `responses`."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    prompt: PromptText | None = None
    messages: list[Turn] | None = None
    system: str | None = None
    responses: list[str] | None = Field(None, description="Candidate responses to judge, when already known.")

    _chat = field_validator("messages")(check_chat)

    @model_validator(mode="after")
    def _has_prompt(self) -> "FeedbackInput":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("needs a 'prompt' string or a 'messages' list (one of them)")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("'messages' must end with a user turn")
        return self

    def chat(self) -> list[Message]:
        """The chat a model answers: the messages, or the prompt as one user turn, after any system message."""
        chat = list(self.messages) if self.messages is not None else [Message(role="user", content=self.prompt)]
        if self.system and chat[0].role != "system":
            chat.insert(0, Message(role="system", content=self.system))
        return chat

    def prompt_value(self) -> Text:
        """The prompt as records store it: the string, or the chat (TRL's conversational form)."""
        return self.prompt if self.prompt is not None else self.chat()

    def prompt_text(self) -> str:
        """The prompt as a judge reads it: the string, the single user turn, or a transcript."""
        if self.prompt is not None:
            return self.prompt
        turns = [m for m in self.chat() if m.role != "system"]
        if len(turns) == 1:
            return turns[0].content
        return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in turns)

    def key(self) -> str:
        """Stable id of this input: links its candidates and judgments back to it."""
        return stable_id(self.model_dump(mode="json", exclude_none=True))


def answer_value(prompt: Text, text: str) -> Text:
    """A response in the prompt's shape: a string, or one assistant turn for a conversational prompt."""
    return text if isinstance(prompt, str) else [Message(role="assistant", content=text)]


@dataclass
class Prompted:
    """One input with every candidate response it will be judged on, in a fixed order."""

    key: str
    where: str
    input: FeedbackInput
    responses: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def assemble(
    inputs: Iterable[tuple[str, FeedbackInput]],
    candidates: dict[str, list[tuple[str, str]]],
    include_given: bool = True,
    dedup: bool = True,
) -> list[Prompted]:
    """Each input (once per key) with its given responses, then its generated (source, text) candidates.

    Empty responses are dropped, and with `dedup` so are exact repeats (after stripping): judging
    them twice buys nothing (self-consistency keeps them: a repeat is a vote).
    """
    out: list[Prompted] = []
    seen: set[str] = set()
    for where, item in inputs:
        key = item.key()
        if key in seen:
            continue
        seen.add(key)
        p = Prompted(key=key, where=where, input=item)
        given = [("input", r) for r in item.responses or []] if include_given else []
        for source, text in [*given, *candidates.get(key, [])]:
            if text.strip() and not (dedup and text.strip() in {r.strip() for r in p.responses}):
                p.responses.append(text)
                p.sources.append(source)
        out.append(p)
    return out


class CandidateGenerator(Generator):
    """Samples candidate responses to each input's chat; each becomes an SFTExample tagged with its source."""

    method = "feedback-candidates"
    input_model = FeedbackInput
    emits = "sft"

    def __init__(self, params, teacher_name: str, source: str):
        super().__init__(params, teacher_name)
        self.source = source

    def messages(self, item: FeedbackInput, where: str) -> list[Message]:
        """The input's own chat."""
        return item.chat()

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Every non-empty sample is a candidate; an empty one is rejected."""
        out = Outcome()
        for sample, c in self.answers(request, response):
            if not c.text.strip():
                out.rejects.append(Reject(task=task.id, reason=f"empty response: {self.source}, sample {sample}", input=_dump(task.input), raw=[c.text]))
                continue
            out.records.append(
                SFTExample(
                    id=stable_id(task.id, sample),
                    prompt=task.input.prompt_value(),
                    completion=c.text,
                    reasoning=c.reasoning,
                    meta={"key": task.input.key(), "source": self.source, "finish_reason": c.finish_reason},
                    provenance=self.provenance(task, sample),
                )
            )
        return out


def candidates_from_rows(rows: Iterable[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """Candidate-stage records grouped by input key as (source, text), in sample order."""
    grouped: dict[str, list[tuple[int, str, str]]] = {}
    for row in rows:
        meta = row["meta"]
        grouped.setdefault(meta["key"], []).append((row["provenance"].get("sample") or 0, meta["source"], row["completion"]))
    return {k: [(s, t) for _, s, t in sorted(v, key=lambda x: x[0])] for k, v in grouped.items()}


class Judgment(BaseModel):
    """One judge's parsed reply about one item (a response, or an ordered pair) of one input."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["judgment"] = "judgment"
    id: str
    key: str = Field(description="The input's key.")
    item: dict[str, Any] = Field(description="Which responses were judged: {index} or {i, j, order}.")
    judge: str
    value: dict[str, Any] = Field(description="The validated reply.")
    finish_reason: str | None = None
    provenance: Provenance


def failure_reason(what: str, judge: str, sample: int, completion: Completion, why: str) -> str:
    """`<category>: <detail>` for a reply that gave no valid `what`; the category is what summaries count."""
    if completion.finish_reason == "length":
        category = f"truncated {what}"
        why = f"cut at max_tokens ({why})"
    elif refusal(completion.text or ""):
        category = "refused to judge"
    else:
        category = f"unparsable {what}"
    return f"{category}: judge {judge}, sample {sample}: {why}"


class JudgeGenerator(Generator):
    """Asks a judge for JSON (`reply_model`), validates it, resamples once (unless greedy), then rejects with the raw text."""

    #: The validated reply.
    reply_model: type[BaseModel]
    #: Noun used in reasons: rating, verdict, critique.
    what: str = "reply"
    emits = "judgment"

    def __init__(self, params, teacher_name: str, template, reply_model: type[BaseModel] | None = None):
        if reply_model is not None:
            self.reply_model = reply_model
        params = params.model_copy(update={"json_schema": strict_schema(self.reply_model)})
        super().__init__(params, teacher_name, template)

    def read(self, text: str) -> tuple[BaseModel | None, str | None]:
        """The validated reply, or why there is none."""
        return parse_model(text, self.reply_model)

    def item_of(self, task: Task) -> dict[str, Any]:
        """What the judgment is about (indices), from the task input."""
        return {"index": task.input.index}

    def annotate(self, completion: Completion) -> dict[str, Any]:
        """Anything beyond the JSON a judgment keeps from the reply (the pairwise judge's P(A)); nothing by default."""
        return {}

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Each valid reply becomes a Judgment; an invalid one is resampled, then rejected with its text."""
        out = Outcome()
        for sample, c in self.answers(request, response):
            value, why = self.read(c.text)
            if value is None:
                reason = failure_reason(self.what, self.teacher_name, sample, c, why)
                out.bad_sample(Reject(task=task.id, reason=reason, input=_dump(task.input), raw=[c.text]), retry=not final)
                continue
            out.records.append(
                Judgment(
                    id=stable_id(task.id, sample),
                    key=task.input.key,
                    item=self.item_of(task),
                    judge=self.teacher_name,
                    value={**value.model_dump(mode="json", by_alias=True), **self.annotate(c)},
                    finish_reason=c.finish_reason,
                    provenance=self.provenance(task, sample),
                )
            )
        return out


def strict_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every object closed (strict structured-output APIs require it)."""
    schema = model.model_json_schema(by_alias=True)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, or None for no values."""
    values = list(values)
    return sum(values) / len(values) if values else None


def pick_best_worst(scores: dict[int, float], min_margin: float) -> tuple[int, int, None] | tuple[None, None, str]:
    """(best, worst, None) by score (first index wins ties), or (None, None, reason) when no pair qualifies."""
    if len(scores) < 2:
        return None, None, f"fewer than 2 scored responses: {len(scores)} scored"
    order = sorted(scores, key=lambda i: (-scores[i], i))
    best, worst = order[0], order[-1]
    margin = scores[best] - scores[worst]
    if margin < min_margin:
        return None, None, f"margin below minimum: best {scores[best]:.2f} vs worst {scores[worst]:.2f} (margin {margin:.2f} < {min_margin})"
    return best, worst, None


def reason_category(reason: str) -> str:
    """The part of a reason before its first colon: what summaries count by."""
    return reason.split(":", 1)[0].strip()


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value

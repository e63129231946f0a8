"""Self-Instruct's generator: shown demonstrations, the teacher proposes new instructions as JSON.

Replies are parsed leniently into candidates (unparsable ones resampled once, then
rejected with the raw text). The rounds, filters and answers are the pipeline's
(synth/pipelines/self_instruct.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.filters.refusal import refusal
from synth.generators.base import Generator, Outcome, Task
from synth.generators.expand.answer import REFUSAL_WORDS
from synth.records import Message, Provenance, Reject, stable_id
from synth.structured import ListReply, parse_model
from synth.teachers.base import ChatRequest, ChatResponse


class NewInstruction(BaseModel):
    """One proposed task."""

    model_config = ConfigDict(extra="ignore")

    instruction: str
    input: str = ""

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"instruction": value}
        if isinstance(value, dict):
            value = dict(value)
            for alt in ("task", "prompt", "question", "指令", "instruction_text"):
                if "instruction" not in value and isinstance(value.get(alt), str):
                    value["instruction"] = value[alt]
            if value.get("input") is None or not isinstance(value.get("input"), str):
                value["input"] = "" if not isinstance(value.get("input"), (int, float)) else str(value["input"])
        return value


class InstructionList(ListReply):
    """The teacher's reply: `{"instructions": [{"instruction": "...", "input": "..."}, ...]}`."""

    list_key = "instructions"
    list_aliases = ("tasks", "new_instructions", "items", "data")

    instructions: list[NewInstruction] = Field(description="New tasks, each an instruction and an optional input.")


def parse_instruction_list(text: str, finish_reason: str | None = None) -> tuple[list[NewInstruction] | None, str | None]:
    """(instructions, None) or (None, reason): reasons start with truncated/refusal/empty/unparsable."""
    parsed, why = parse_model(text, InstructionList)
    if parsed is None:
        if finish_reason == "length":
            return None, f"truncated: the reply hit max_tokens before its JSON was complete ({why})"
        if not text.strip():
            return None, "empty: the reply is empty"
        if refusal(text, within_words=REFUSAL_WORDS):
            return None, "refusal: the teacher declined"
        return None, f"unparsable: {why}"
    items = [NewInstruction(instruction=i.instruction.strip(), input=i.input.strip()) for i in parsed.instructions if i.instruction.strip()]
    if not items:
        return None, "empty: the reply lists no instructions"
    return items, None


class RoundRequest(BaseModel):
    """One request of one round: the demonstrations shown and how many new tasks to ask for."""

    model_config = ConfigDict(extra="forbid")

    round: int
    request: int
    count: int
    demos: list[dict[str, str]]


class Candidate(BaseModel):
    """A proposed instruction, before filtering (a round job's record)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["candidate"] = "candidate"
    id: str
    instruction: str
    input: str = ""
    round: int
    request: int
    index: int
    provenance: Provenance


class ProposeGenerator(Generator):
    """Asks for new instructions given demonstrations; each one in the reply becomes a Candidate."""

    method = "self-instruct"
    input_model = RoundRequest
    emits = "candidate"

    def messages(self, item: RoundRequest, where: str) -> list[Message]:
        """The request: the demonstrations and the JSON shape wanted."""
        return [Message(role="user", content=self.template.render(where, demos=item.demos, count=item.count))]

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Unparsable replies are resampled once, then rejected with the raw text."""
        out = Outcome()
        item: RoundRequest = task.input
        for sample, completion in self.answers(request, response):
            found, why = parse_instruction_list(completion.text, completion.finish_reason)
            if found is None:
                out.bad_sample(Reject(task=task.id, reason=f"sample {sample}: {why}", input={"round": item.round, "request": item.request}, raw=[completion.text]),
                               retry=not final)  # fmt: skip
                continue
            prov = self.provenance(task, sample)
            out.records.extend(
                Candidate(id=stable_id(task.id, sample, j), instruction=c.instruction, input=c.input, round=item.round,
                          request=item.request, index=j, provenance=prov)
                for j, c in enumerate(found[: item.count])
            )  # fmt: skip
        return out

"""The records synthesis writes and training reads, their chat turns, and their TRL column formats.

A leaf module: every other part of synth (teachers included) may import it, and it imports none of them.

TRL reads three shapes: `messages`; `prompt`/`completion`; `prompt`/`chosen`/
`rejected`. Each record here turns into exactly one of them with `to_trl()`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    """One chat turn: what a teacher is asked and what a record holds."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


#: A prompt or answer: plain text, or a list of chat turns (TRL's conversational form).
Text = Union[str, list[Message]]


def stable_id(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts: the same inputs always give the same id."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class Provenance(BaseModel):
    """Where a record came from: enough to reproduce it and to find its cached responses."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(description="Backend and model, e.g. openai:gpt-4o-mini (never a key).")
    method: str = Field(description="The generator that made it: generate, label, expand, …")
    template: str | None = None
    template_hash: str | None = None
    params: dict[str, Any] = Field(default_factory=dict, description="Sampling and method parameters.")
    task: str = Field(description="Id of the unit of work (one input) that produced this record.")
    sample: int | None = Field(None, description="Sample index within the task, when it has several.")


class SoftLabels(BaseModel):
    """The teacher's top-k log-probabilities at each generated position.

    `top_ids` is set where the backend gives token ids (local, vLLM); HTTP APIs give
    token strings only, kept in `top_tokens` for the KD trainer to map with the tokenizer.
    """

    model_config = ConfigDict(extra="forbid")

    tokenizer: str | None = Field(description="Name of the teacher's tokenizer; KD refuses a student with another.")
    tokens: list[str]
    token_ids: list[int] | None = None
    top_tokens: list[list[str]] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]]

    @model_validator(mode="after")
    def _aligned(self) -> "SoftLabels":
        n = len(self.tokens)
        for name in ("token_ids", "top_tokens", "top_ids", "top_logprobs"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} positions, tokens has {n}")
        return self


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    provenance: Provenance
    meta: dict[str, Any] = Field(default_factory=dict, description="Method-specific extras: answers, votes, scores.")


class SFTExample(_Record):
    """A supervised example: either `messages`, or `prompt` and `completion`."""

    kind: Literal["sft"] = "sft"
    messages: list[Message] | None = None
    prompt: Text | None = None
    completion: Text | None = None
    soft_labels: SoftLabels | None = None
    reasoning: str | None = Field(
        None, description="A reasoning teacher's chain of thought before its answer (not trained on; see --reasoning inline)."
    )

    @model_validator(mode="after")
    def _one_shape(self) -> "SFTExample":
        has_pair = self.prompt is not None or self.completion is not None
        if self.messages is not None and has_pair:
            raise ValueError("give either messages or prompt/completion, not both")
        if self.messages is None and (self.prompt is None or self.completion is None):
            raise ValueError("needs messages, or both prompt and completion")
        return self

    def to_trl(self) -> dict[str, Any]:
        """TRL's `messages` or `prompt`/`completion` columns."""
        if self.messages is not None:
            return {"messages": _dump(self.messages)}
        return {"prompt": _dump(self.prompt), "completion": _dump(self.completion)}


class PreferencePair(_Record):
    """A prompt with a better and a worse answer, and the scores that ranked them."""

    kind: Literal["preference"] = "preference"
    prompt: Text
    chosen: Text
    rejected: Text
    score_chosen: float | None = None
    score_rejected: float | None = None

    def to_trl(self) -> dict[str, Any]:
        """TRL's `prompt`/`chosen`/`rejected` columns."""
        return {"prompt": _dump(self.prompt), "chosen": _dump(self.chosen), "rejected": _dump(self.rejected)}


class Critique(_Record):
    """The teacher's critique of a response, and its corrected version where it wrote one."""

    kind: Literal["critique"] = "critique"
    prompt: Text
    response: str
    critique: str
    corrected: str | None = None
    score: float | None = None

    def to_trl(self) -> dict[str, Any]:
        """The corrected answer as `prompt`/`completion` (critiques without one have no TRL form)."""
        if self.corrected is None:
            raise ValueError(f"critique {self.id} has no corrected response to train on")
        return {"prompt": _dump(self.prompt), "completion": self.corrected}


class Reject(BaseModel):
    """An input or sample that produced no record, and why. Kept beside the output."""

    model_config = ConfigDict(extra="forbid")

    task: str
    reason: str
    input: Any = None
    raw: list[str] = Field(default_factory=list, description="The teacher's raw text, when there was one.")
    error: bool = Field(False, description="True when the teacher failed (nothing was received; a rerun retries it).")
    retryable: bool | None = Field(
        None, description="For a teacher failure: whether it may pass if asked again (a 429, 5xx, timeout), not a 400 that always fails."
    )


Record = Union[SFTExample, PreferencePair, Critique]
RECORD_TYPES: dict[str, type[BaseModel]] = {"sft": SFTExample, "preference": PreferencePair, "critique": Critique}


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [m.model_dump() if isinstance(m, BaseModel) else m for m in value]
    return value

"""Evol-Instruct: evolve instructions in depth and in breadth, eliminate failed evolutions, answer the rest.

Per round, each instruction of the pool is evolved by one operation drawn with an RNG
seeded by (seed, round, instruction id): in depth (add constraints, deepen, concretize,
more reasoning steps, complicate the input) or in breadth (a new, rarer task of the same
domain). An evolution is eliminated, with the rule that fired, when:

1. the evolved prompt copies the evolving prompt's wording ("#Rewritten Prompt#", "given prompt", …);
2. it brings no information gain. `info_gain: heuristic` (the default, no request): equal to
   the original after normalisation; in depth, fewer than `min_new_words` words that the
   original lacks; in breadth, a near copy of the original (shingle Jaccard at or above the
   dedup threshold). `info_gain: teacher` asks the teacher WizardLM's "Equal / Not Equal"
   question instead (after the normalised-equality check);
3. it near-duplicates an instruction already accepted (inputs and earlier evolutions,
   its own ancestors excepted: they are what rule 2 judges);
4. its answer is a refusal ("sorry", "as an AI" in a reply under `refusal_words` words),
   too short (fewer than `min_answer_words` content words), truncated or empty.

Survivors become SFT examples and replace their parent in the pool; a parent whose
evolution failed stays for the next round (as in WizardLM). The output holds the evolved
pairs only, not the inputs.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.filters.dedup import Shingler, normalize, tokenize
from synth.filters.refusal import refusal
from synth.generators.base import Generator, Outcome, Task
from synth.generators.expand.answer import REFUSAL_WORDS
from synth.records import Message, Provenance, Reject, stable_id
from synth.structured import parse_model
from synth.teachers.base import ChatRequest, ChatResponse

IN_DEPTH = ("constraints", "deepen", "concretize", "reasoning", "complicate_input")
OPERATIONS = (*IN_DEPTH, "breadth")
Operation = Literal["constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth"]

_COPIED = re.compile(
    r"#\s*(the\s+)?(given|rewritten|created|new)\s+prompt\s*#|\b(the\s+)?(given|rewritten|created)\s+prompt\b|prompt\s+(rewriter|creator)"
    r"|#\s*(给定提示|改写提示|新提示)\s*#|给定(的)?提示|改写(后的)?提示|重写(后的)?提示|创建的提示|提示改写者|提示创作者",
    re.IGNORECASE,
)


class EvolvedPrompt(BaseModel):
    """The teacher's reply to an evolution request: `{"instruction": "..."}`."""

    model_config = ConfigDict(extra="ignore")

    instruction: str = Field(description="The rewritten (or newly created) prompt.")

    @model_validator(mode="before")
    @classmethod
    def _lenient(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"instruction": value}
        if isinstance(value, dict) and not isinstance(value.get("instruction"), str):
            for key, v in value.items():
                if isinstance(v, str) and re.sub(r"[^a-z]", "", key.lower()) in {"prompt", "rewrittenprompt", "createdprompt", "newprompt", "evolvedprompt", "newinstruction"}:
                    return {**value, "instruction": v}
        return value


def parse_evolved(text: str, finish_reason: str | None = None) -> tuple[str | None, str | None]:
    """(the evolved prompt, None) or (None, reason): reasons start with truncated/refusal/empty/unparsable.

    A reply with no "{" at all is taken as the bare prompt (teachers without JSON output).
    """
    parsed, why = parse_model(text, EvolvedPrompt)
    if parsed is None and "{" not in text and text.strip() and finish_reason != "length" and not refusal(text, within_words=REFUSAL_WORDS):
        # No JSON attempted at all: WizardLM's own format is the bare rewritten prompt, so take the text.
        parsed = EvolvedPrompt(instruction=text)
    if parsed is None:
        if finish_reason == "length":
            return None, f"truncated: the reply hit max_tokens before its JSON was complete ({why})"
        if not text.strip():
            return None, "empty: the reply is empty"
        if refusal(text, within_words=REFUSAL_WORDS):
            return None, "refusal: the teacher declined"
        return None, f"unparsable: {why}"
    prompt = parsed.instruction.strip()
    if not prompt:
        return None, "empty: the evolved prompt is empty"
    return prompt, None


def copies_wording(evolved: str) -> str | None:
    """Rule 1: the evolved prompt repeats the evolving prompt's own words."""
    m = _COPIED.search(evolved)
    return f"copies the prompt's wording: contains {m.group(0)!r}" if m else None


def no_gain(original: str, evolved: str, operation: str, min_new_words: int, shingler: Shingler, threshold: float, heuristic: bool = True) -> str | None:
    """Rule 2 without the teacher: why the evolution adds nothing, or None. With `heuristic` off, only the equality check."""
    if normalize(original) == normalize(evolved):
        return "no information gain: equal to the original after normalisation"
    if not heuristic:
        return None
    if operation == "breadth":
        sim = shingler.similarity(original, evolved)
        if sim >= threshold:
            return f"no information gain: a near copy of the original, not a new task (shingle Jaccard {sim:.2f})"
        return None
    new = set(tokenize(normalize(evolved))) - set(tokenize(normalize(original)))
    if len(new) < min_new_words:
        return f"no information gain: adds {len(new)} new words (minimum {min_new_words})"
    return None


def parse_verdict(text: str) -> bool | None:
    """The judge's answer to "are they equal?": True (equal), False (not equal) or None (neither)."""
    t = normalize(text)
    if re.search(r"\b(not equal|unequal|not the same|different)\b", t) or re.search(r"不相同|不同|不一样|不相等", t):
        return False
    if re.search(r"\b(equal|the same|same)\b", t) or re.search(r"相同|一样|相等", t):
        return True
    return None


def pick_operation(seed: int, rnd: int, key: str, operations: list[str]) -> str:
    """The operation one instruction gets in one round: seeded, so every run draws the same."""
    return random.Random(f"{seed}:{rnd}:{key}").choice(operations)


class EvolInput(BaseModel):
    """One instruction to evolve in one round."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    operation: Operation
    round: int
    root: str


class Evolved(BaseModel):
    """An evolved prompt (an evolve job's record), before elimination."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["evolved"] = "evolved"
    id: str
    parent: str
    root: str
    operation: Operation
    round: int
    original: str
    instruction: str
    provenance: Provenance


class EvolveGenerator(Generator):
    """Rewrites one prompt with the template of its operation; the JSON reply becomes an Evolved record."""

    method = "evol-instruct"
    input_model = EvolInput
    emits = "evolved"

    def __init__(self, params, teacher_name, templates: dict[str, Any]):
        super().__init__(params, teacher_name, None)
        self.templates = templates

    def messages(self, item: EvolInput, where: str) -> list[Message]:
        """The operation's template filled with the prompt."""
        return [Message(role="user", content=self.templates[item.operation].render(where, prompt=item.prompt))]

    def task_id(self, item: BaseModel) -> str:
        """Stable hash of the input, method, the operation's template and the parameters."""
        return stable_id(item.model_dump(mode="json"), self.method, self.templates[item.operation].hash, self._params_json)

    def provenance(self, task: Task, sample: int | None) -> Provenance:
        """Provenance naming the operation's template."""
        t = self.templates[task.input.operation]
        return Provenance(teacher=self.teacher_name, method=self.method, template=t.name, template_hash=t.hash,
                          params=self._params_json, task=task.id, sample=sample)  # fmt: skip

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Unparsable replies are resampled once, then rejected with the raw text."""
        out = Outcome()
        item: EvolInput = task.input
        for sample, completion in self.answers(request, response):
            prompt, why = parse_evolved(completion.text, completion.finish_reason)
            if prompt is None:
                out.bad_sample(Reject(task=task.id, reason=f"sample {sample}: {why}", input=item.model_dump(mode="json"), raw=[completion.text]), retry=not final)
            else:
                out.records.append(Evolved(id=stable_id(task.id, sample), parent=item.id, root=item.root, operation=item.operation,
                                           round=item.round, original=item.prompt, instruction=prompt, provenance=self.provenance(task, sample)))  # fmt: skip
        return out


class EquivalenceInput(BaseModel):
    """An evolution to judge for information gain: is it equal to its original?"""

    model_config = ConfigDict(extra="forbid")

    id: str
    original: str
    evolved: str


class EquivalenceVerdict(BaseModel):
    """The teacher's judgement of one evolution (an equivalence job's record)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["verdict"] = "verdict"
    id: str
    equal: bool
    text: str
    provenance: Provenance


class EquivalenceJudge(Generator):
    """WizardLM's information-gain check: the teacher says whether an evolved prompt equals its original (then it is eliminated)."""

    method = "evol-instruct-judge"
    input_model = EquivalenceInput
    emits = "verdict"

    def messages(self, item: EquivalenceInput, where: str) -> list[Message]:
        """The comparison question."""
        return [Message(role="user", content=self.template.render(where, original=item.original, evolved=item.evolved))]

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """A verdict per reply; neither "equal" nor "not equal" is resampled once, then rejected."""
        out = Outcome()
        for sample, completion in self.answers(request, response):
            verdict = parse_verdict(completion.text)
            if verdict is None:
                out.bad_sample(Reject(task=task.id, reason=f"sample {sample}: unparsable verdict: neither Equal nor Not Equal",
                                      input=task.input.model_dump(mode="json"), raw=[completion.text]), retry=not final)  # fmt: skip
            else:
                out.records.append(EquivalenceVerdict(id=task.input.id, equal=verdict, text=completion.text, provenance=self.provenance(task, sample)))
        return out

"""Expansion, the parts Self-Instruct and Evol-Instruct share: instruction and answer filters, the instruction answerer.

Self-Instruct's generators live in self_instruct.py, Evol-Instruct's in evol.py;
their pipelines in synth/pipelines/. Both end with the answer stage here: each kept
instruction is answered by the teacher and becomes an SFT example in TRL's conversational
prompt/completion form (prompt = the chat the teacher answered, completion = [its assistant message]).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synth.filters.dedup import normalize, tokenize
from synth.filters.refusal import refusal
from synth.generators.answer import AnswerGenerator
from synth.generators.base import Task
from synth.records import Message, Reject
from synth.teachers.base import Completion

#: Self-Instruct's list of tasks a text model cannot do, and their Chinese counterparts.
NON_TEXT_WORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                  "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
                  "图片", "图像", "画一", "绘制", "视频", "音频", "音乐", "流程图", "示意图"]  # fmt: skip

#: A free-text reply shorter than this many words that holds a refusal phrase declines (WizardLM's rule).
REFUSAL_WORDS = 80
_STOP = set("a an the and or but of to in on at for with by is are was were be been it this that these those i you he she we "
            "they me my your our their as so if then than there here do does did not no yes ok okay".split())


# -- filters on instructions and answers ------------------------------------------------------
def length_of(text: str) -> int:
    """Words, counting each Chinese/Japanese character as one."""
    return len(tokenize(normalize(text)))


def instruction_problem(text: str, min_len: int, max_len: int, blocked: list[str]) -> str | None:
    """Why a new instruction is filtered out (a reason starting "filtered:"), or None."""
    stripped = text.strip()
    n = length_of(stripped)
    if n < min_len:
        return f"filtered: too short ({n} words, minimum {min_len})"
    if n > max_len:
        return f"filtered: too long ({n} words, maximum {max_len})"
    if not stripped[0].isalnum():
        return f"filtered: starts with punctuation ({stripped[0]!r})"
    low = stripped.lower()
    for word in blocked:
        w = word.lower()
        hit = re.search(rf"\b{re.escape(w)}\b", low) if w.isascii() else w in low
        if hit:
            return f"filtered: not a text task (mentions {word!r})"
    return None


def content_words(text: str) -> int:
    """Tokens that are not punctuation or stop words."""
    return sum(1 for t in tokenize(normalize(text)) if t not in _STOP)


def answer_problem(text: str, finish_reason: str | None, min_words: int, refusal_words: int) -> str | None:
    """Why an answer is not kept (truncated, empty, refusal, too short), or None."""
    if finish_reason == "length":
        return "truncated: the answer hit max_tokens"
    if not text.strip():
        return "empty: the answer is empty"
    if refusal(text, within_words=refusal_words):
        return "refusal: the answer declines"
    n = content_words(text)
    if n < min_words:
        return f"too short: {n} content words (minimum {min_words})"
    return None


# -- the answer stage -------------------------------------------------------------------------
class AnswerInput(BaseModel):
    """An instruction kept by expansion, to be answered; `meta` rides along into the record."""

    model_config = ConfigDict(extra="forbid")

    id: str
    instruction: str
    input: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)


class InstructionAnswerGenerator(AnswerGenerator):
    """Answers one instruction; problems (truncated, refusal, too short) become rejects, empty ones are resampled once."""

    input_model = AnswerInput

    def __init__(self, params, teacher_name, template, *, method: str, min_words: int = 1, refusal_words: int = REFUSAL_WORDS,
                 tokenizer: str | None = None, reason_prefix: str = ""):  # fmt: skip
        super().__init__(params, teacher_name, template, tokenizer=tokenizer)
        self.method = method
        self.min_words = min_words
        self.refusal_words = refusal_words
        self.reason_prefix = reason_prefix

    def messages(self, item: AnswerInput, where: str) -> list[Message]:
        """The instruction (and its input) through the answer template."""
        return [Message(role="user", content=self.template.render(where, instruction=item.instruction, input=item.input))]

    def problem(self, completion: Completion) -> str | None:
        """Truncated, empty, a refusal or too short (`answer_problem`)."""
        return answer_problem(completion.text, completion.finish_reason, self.min_words, self.refusal_words)

    def reject(self, task: Task, sample: int, problem: str, raw: str) -> Reject:
        """The problem after the stage's reason prefix."""
        return Reject(task=task.id, reason=self.reason_prefix + problem, input=task.input.model_dump(mode="json"), raw=[raw])

    def meta(self, item: AnswerInput, completion: Completion) -> dict[str, Any]:
        """The instruction's meta and id, and how the answer finished."""
        return {**item.meta, "instruction_id": item.id, "finish_reason": completion.finish_reason}

"""A reasoning model's thinking, told apart from its answer when it comes inline as `<think>…</think>`.

Servers with a reasoning parser (DeepSeek's API, vLLM, llama.cpp) return the thinking in its
own field; local backends and servers without one return it in the text. Both end up the same:
`Completion.text` is the answer, `Completion.reasoning` the thinking.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synth.teachers.base import TokenLogprob

OPEN, CLOSE = "<think>", "</think>"
_OPEN_AT_START = re.compile(r"^\s*<think>")


def split_reasoning(text: str) -> tuple[str | None, str, int]:
    """(reasoning, answer, where the answer starts in `text`) of a generated text.

    `<think>R</think>A` gives (R, A). A text with only the closing tag (R1-style templates put
    `<think>` in the prompt) gives the text before it as reasoning. An opening tag never closed
    means the model was cut off while thinking: all of it is reasoning and the answer is empty.
    A text with neither tag is all answer. The whitespace between the parts is dropped; the answer
    keeps its own (its tokens and logprobs must still spell it).
    """
    opened = _OPEN_AT_START.match(text)
    close = text.find(CLOSE)
    if close < 0:
        if opened:
            return text[opened.end() :].strip(), "", len(text)
        return None, text, 0
    if not opened and OPEN in text[:close]:
        return None, text, 0  # a tag quoted inside an answer, not a thinking block
    start = opened.end() if opened else 0
    reasoning = text[start:close].strip()
    answer_at = close + len(CLOSE)
    answer_at += len(text[answer_at:]) - len(text[answer_at:].lstrip())
    return reasoning, text[answer_at:], answer_at


def inline(reasoning: str | None, answer: str) -> str:
    """The answer with its reasoning in front, as R1-distilled models write it: `<think>\\nR\\n</think>\\n\\nA`."""
    if not reasoning:
        return answer
    return f"{OPEN}\n{reasoning}\n{CLOSE}\n\n{answer}"


def answer_logprobs(logprobs: list["TokenLogprob"], answer_at: int) -> list["TokenLogprob"] | None:
    """The logprobs of the tokens from character `answer_at` of the text they spell on, or None when no token starts there.

    A token that straddles the reasoning and the answer has no place in either: rather than
    misalign soft labels with the answer's text, the answer gets none.
    """
    spelled = 0
    for i, token in enumerate(logprobs):
        if spelled == answer_at:
            return logprobs[i:]
        if spelled > answer_at:
            return None
        spelled += len(token.token)
    return [] if spelled == answer_at else None

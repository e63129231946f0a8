"""A reasoning model's thinking, told apart from its answer when it comes inline as `<think>…</think>`.

Servers with a reasoning parser (DeepSeek's API, vLLM, llama.cpp) return the thinking in its
own field; local backends and servers without one return it in the text. Both end up the same:
`Completion.text` is the answer, `Completion.reasoning` the thinking.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

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


class ReasoningSplit(NamedTuple):
    """A generated text cut into thinking and answer, and how many of its tokens the thinking part takes."""

    reasoning: str | None
    answer: str
    #: Tokens spelling the thinking, its tags and the gap before the answer.
    reasoning_tokens: int
    #: Whether those tokens end exactly where the answer starts (else per-token logprobs would misalign).
    aligned: bool


def split_generated(text: str, n_tokens: int, spell: Callable[[int], str] | None) -> ReasoningSplit:
    """`text` (spelled by `n_tokens` tokens) split by `split_reasoning`, with the tokens of its thinking counted.

    `spell(n)` is the text of the first n tokens: a prefix decode, or the first n pieces joined
    (see `spelled_by`); None when the tokens are unknown (then the count is 0 and not aligned).
    The count is the fewest tokens whose text reaches the answer's start; when a token spans
    that start (say " The" after "</think>"), it is counted and `aligned` is False.
    """
    reasoning, answer, answer_at = split_reasoning(text)
    if answer_at == 0:
        return ReasoningSplit(reasoning, answer, 0, True)
    if spell is None:
        return ReasoningSplit(reasoning, answer, 0, False)
    # A prefix's text grows with its token count, so a binary search needs only ~log2(n) decodes.
    lo, hi = 0, n_tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if len(spell(mid)) >= answer_at:
            hi = mid
        else:
            lo = mid + 1
    return ReasoningSplit(reasoning, answer, lo, spell(lo) == text[:answer_at])


def spelled_by(pieces: Sequence[str]) -> Callable[[int], str]:
    """`spell(n)` for `split_generated` from per-token pieces: the first n pieces joined."""
    return lambda n: "".join(pieces[:n])

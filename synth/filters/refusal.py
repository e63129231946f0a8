"""Whether a teacher's reply declines to do what it was asked: one rule for every generator."""

from __future__ import annotations

import re

from synth.filters.dedup import normalize, tokenize

# A reply that opens with one of these declines: checked on replies that should have held JSON
# (a question list, a judgment), where an opening apology means there is no answer in it.
_OPENING = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry|i apologi[sz]e|i cannot|i can'?t|i won'?t|i am unable|i'm unable|i'?m not able"
    r"|as an ai|as a language model|as an artificial intelligence"
    r"|抱歉|对不起|很抱歉|很遗憾|我不能|我无法|作为一个?(ai|人工智能|语言模型))",
    re.IGNORECASE,
)
# The same phrases anywhere in a short free-text reply (WizardLM's rule). Narrower than the opening
# list: a bare "sorry" or "I can't" inside a real answer or a rewritten prompt is not a refusal.
_ANYWHERE = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry, but|i apologi[sz]e|i cannot|i can'?t (help|assist|provide|do)|i am unable|"
    r"i'?m unable|i'?m not able|as an ai|as a language model|as an artificial intelligence)\b"
    r"|抱歉|对不起|很遗憾|我无法|我不能|作为一个?(ai|人工智能|语言模型)",
    re.IGNORECASE,
)


def refusal(text: str, within_words: int | None = None) -> str | None:
    """The phrase with which `text` declines, or None.

    By default the reply must open with it. With `within_words`, a free-text reply shorter than
    that many words declines when it holds a refusal phrase anywhere; a longer one that says
    "sorry" once is usually a real answer.
    """
    if within_words is None:
        found = _OPENING.match(text)
        return found.group(1) if found else None
    found = _ANYWHERE.search(text) if len(tokenize(normalize(text))) < within_words else None
    return found.group(0) if found else None

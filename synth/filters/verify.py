"""Checkable answers: pull the final answer out of a reply, read a reference, compare, vote.

Nothing here knows about teachers or generators, so labeling, self-knowledge and
evaluation share one notion of "the same answer". Checkers are looked up by name
(`numeric`, `exact`, anything registered with `register_checker`) or imported from
a `module:function` path.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from fractions import Fraction
from typing import Callable, Sequence

from synth.errors import ConfigError

#: checker(predicted, reference) -> True when they are the same answer.
Checker = Callable[[str, str], bool]

# "Answer: 72", "**Final answer:** 72", "答案：72", "最终答案: 72". The last one in the reply wins.
_ANSWER_LINE = re.compile(
    r"(?:^|\n)[ \t>*#_-]*(?:final\s+answer|answer|最终答案|答案)[ \t*_]*(?:is)?[ \t]*[:：][ \t*_]*([^\n]+)",
    re.IGNORECASE,
)
_ANSWER_INLINE = re.compile(r"(?:final\s+answer|answer)\s*[:：]\s*([^\n]+)", re.IGNORECASE)
_THE_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|答案是|答案为)[ \t:：]*([^\n]+?)(?:\.(?=\s|$)|。|\n|$)", re.IGNORECASE
)
_HASHES = re.compile(r"####[ \t]*([^\n]+)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*)?\.?\d+(?:/\d+)?")
# A number alone, with currency before it and a percent sign or unit words after it.
_CLEAN_NUMBER = re.compile(
    r"^[-+]?[$€£¥]?\s*(?P<num>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?)\s*(?:%|[^\W\d_][\w\s.]*)?$"
)
_LATEX_WRAP = re.compile(r"^(?:\$\$?|\\\(|\\\[)(.*?)(?:\$\$?|\\\)|\\\])$", re.DOTALL)
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_PLACEHOLDER = re.compile(r"^<[^<>]*>$")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?\d+)\s*\}\s*\{\s*(\d+)\s*\}")


def end_of_first_answer_line(text: str) -> int | None:
    """Where the first "Answer: X" line ends (its newline excluded), or None when there is none."""
    m = _ANSWER_LINE.search(text)
    if not m or not m.group(1).strip():
        return None
    return m.end(1)


def boxed_contents(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1]
    return found


def clean_answer(answer: str) -> str:
    """Strip the wrapping an answer often carries: bold, `$...$`, `\\boxed{}`, `\\text{}`, a final period."""
    s = answer.strip()
    for _ in range(3):  # wrappings nest, e.g. **$\boxed{5}$**
        before = s
        s = s.strip().strip("*_`\"'“”").strip()
        boxed = boxed_contents(s)
        if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
            s = boxed
        m = _LATEX_WRAP.match(s)
        if m and not _CLEAN_NUMBER.match(s):  # "$5" is money, "$5$" is maths
            s = m.group(1)
        s = _TEXT_CMD.sub(r"\1", s).rstrip(" .。!！")
        if s == before:
            break
    return s.strip()


def extract_answer(text: str, *, number_fallback: bool = False) -> str | None:
    """The final answer of a reply, or None when it states none.

    Looks, in order, for the last "Answer: X" / "答案：X" line, a `\\boxed{X}`, a GSM8K
    "#### X", "The answer is X"; with `number_fallback`, then the last number in the text.
    """
    for find in (_last_group(_ANSWER_LINE), boxed_contents, _last_group(_HASHES), _last_group(_ANSWER_INLINE), _last_group(_THE_ANSWER_IS)):
        raw = find(text)
        if raw is not None:
            answer = clean_answer(raw)
            # "<answer>" is the template's placeholder echoed back, not an answer.
            if answer and not _PLACEHOLDER.match(answer):
                return answer
    if number_fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].rstrip(".")
    return None


def _last_group(pattern: re.Pattern) -> Callable[[str], str | None]:
    def find(text: str) -> str | None:
        last = None
        for m in pattern.finditer(text):
            last = m.group(1)
        return last

    return find


def reference_answer(reference: object) -> str | None:
    """The answer in a reference: the part after GSM8K's "####", else the whole value; None when empty."""
    if reference is None:
        return None
    text = str(reference).strip()
    m = re.search(r"####\s*(.+?)\s*$", text, re.DOTALL)
    if m:
        text = m.group(1)
    text = clean_answer(text)
    return text or None


def parse_number(answer: str) -> Fraction | None:
    """The number an answer states, exactly: "$1,234.00" → 1234, "72 clips" → 72, "50%" → 50, "3/4" → 3/4.

    An answer that is not a lone number (e.g. "5 + 3 = 8") gives its last number; text with no digits gives None.
    """
    s = unicodedata.normalize("NFKC", answer).strip().rstrip(" .。")
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\!", "").replace("−", "-")
    s = _FRAC.sub(r"\1/\2", s)
    m = _CLEAN_NUMBER.match(s)
    token = m.group("num") if m and re.search(r"\d", m.group("num")) else None
    if token is None:
        numbers = _NUMBER.findall(s)
        if not numbers:
            return None
        token = numbers[-1]
    if s.lstrip().startswith("-") and not token.startswith(("-", "+")) and m:
        token = "-" + token
    try:
        return Fraction(token.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def normalize_text(answer: str) -> str:
    """An answer for exact comparison: NFKC, case-folded, whitespace collapsed, wrapping and final period gone."""
    s = unicodedata.normalize("NFKC", clean_answer(answer)).casefold()
    return " ".join(s.split()).rstrip(" .。")


def exact_checker(predicted: str, reference: str) -> bool:
    """Normalised exact string match."""
    return normalize_text(predicted) == normalize_text(reference)


def numeric_checker(predicted: str, reference: str) -> bool:
    """Numbers compared as numbers (72 == 72.0 == "$72.00"); otherwise a normalised exact match."""
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return exact_checker(predicted, reference)


_CHECKERS: dict[str, Checker] = {"numeric": numeric_checker, "exact": exact_checker}


def register_checker(name: str, fn: Checker | None = None):
    """Register `fn(predicted, reference) -> bool` under `name`; usable as a decorator."""

    def add(f: Checker) -> Checker:
        _CHECKERS[name] = f
        return f

    return add(fn) if fn is not None else add


def checker_names() -> list[str]:
    """The names `get_checker` knows without an import."""
    return sorted(_CHECKERS)


def get_checker(name: str) -> Checker:
    """A checker by registered name, or a callable imported from `package.module:function`.

    An imported checker is wrapped so that an exception it raises is a ConfigError naming it.
    """
    if name in _CHECKERS:
        return _CHECKERS[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"unknown checker {name!r}: use one of {', '.join(checker_names())} or module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # importing runs the module's code: anything can go wrong there
        raise ConfigError(f"checker {name!r}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise ConfigError(f"checker {name!r} is not callable")

    def checked(predicted: str, reference: str) -> bool:
        try:
            return bool(fn(predicted, reference))
        except Exception as exc:
            raise ConfigError(f"checker {name!r} failed comparing {predicted!r} with {reference!r}: {type(exc).__name__}: {exc}") from None

    checked.__wrapped__ = fn
    return checked


def probe_checker(name: str, answer: str, where: str) -> None:
    """Call checker `name` once, on `answer` against itself, so a checker that cannot run is found before any request.

    `where` says where the answer came from (e.g. `data.jsonl:1's reference answer`).
    """
    checker = get_checker(name)
    try:
        getattr(checker, "__wrapped__", checker)(answer, answer)
    except Exception as exc:
        raise ConfigError(f"checker {name!r} fails on {where}: {type(exc).__name__}: {exc}") from None


def group_answers(answers: Sequence[str], checker: Checker) -> list[list[int]]:
    """Indices of `answers` grouped into classes of the same answer, in order of first appearance.

    Each answer joins the first group whose first member the checker says it equals, so any
    checker (even a non-transitive one) gives the same groups for the same answers.
    """
    groups: list[list[int]] = []
    for i, answer in enumerate(answers):
        for group in groups:
            if checker(answer, answers[group[0]]):
                group.append(i)
                break
        else:
            groups.append([i])
    return groups


def majority(answers: Sequence[str], checker: Checker) -> list[int] | None:
    """The indices of the most common answer; a tie goes to the answer that appeared first. None if no answers."""
    groups = group_answers(answers, checker)
    # max() keeps the first of equal counts, and groups are in order of first appearance.
    return max(groups, key=len) if groups else None

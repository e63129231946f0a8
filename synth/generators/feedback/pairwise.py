"""Pairwise mode: A vs B judged twice with the order swapped; only consistent verdicts count; ties dropped."""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import combinations
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth.generators.base import Task
from synth.generators.feedback.base import JudgeGenerator, Prompted, answer_value
from synth.records import Message, PreferencePair, Provenance, Reject, stable_id
from synth.structured import parse_model
from synth.teachers.base import Completion

_WINNERS = {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie", "平局": "tie", "平手": "tie"}


class Verdict(BaseModel):
    """A judge's verdict on one ordered pair."""

    model_config = ConfigDict(extra="ignore")

    winner: Literal["A", "B", "tie"] = Field(description='"A", "B" or "tie".')
    reason: str = Field(description="One sentence saying why.")

    @field_validator("winner", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        # Judges write "a", "Response B", "[[A]]", "Tie": the same verdicts in other dress.
        if not isinstance(value, str):
            return value
        v = value.strip().strip("[]()\"'.* ").lower()
        for prefix in ("response ", "assistant ", "output ", "回答", "回复"):
            v = v.removeprefix(prefix).strip()
        return _WINNERS.get(v, value)


def parse_verdict(text: str) -> tuple[Verdict | None, str | None]:
    """(verdict, None) for a valid reply, else (None, why); a winner other than A, B or tie is invalid."""
    return parse_model(text, Verdict)


class PairItem(BaseModel):
    """Responses i and j of one input, shown in one order (ab: i is A; ba: j is A)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    i: int
    j: int
    order: Literal["ab", "ba"]
    prompt: str
    response_a: str
    response_b: str


class PairwiseGenerator(JudgeGenerator):
    """Asks a judge which of two responses is better, one order per request."""

    method = "feedback-pairwise"
    input_model = PairItem
    reply_model = Verdict
    what = "verdict"

    def messages(self, item: PairItem, where: str) -> list[Message]:
        """The pairwise template filled with the prompt and the two responses in this item's order."""
        text = self.template.render(where, prompt=item.prompt, response_a=item.response_a, response_b=item.response_b)
        return [Message(role="user", content=text)]

    def item_of(self, task: Task) -> dict[str, Any]:
        """The pair and the order it was shown in."""
        return {"i": task.input.i, "j": task.input.j, "order": task.input.order}

    def read(self, text: str) -> tuple[BaseModel | None, str | None]:
        """The verdict; when verdicts are decided by P(A) (logprobs asked for), also one whose JSON broke after the winner."""
        verdict, why = super().read(text)
        if verdict is None and self.params.logprobs and (found := _WINNER_FIELD.search(text)):
            # The decision comes from P(A) at the winner token: a reason cut short or garbled loses nothing it needs.
            return Verdict(winner=found.group(1), reason=f"(reply broken after the winner: {why})"), None
        return verdict, why

    def annotate(self, completion: Completion) -> dict[str, Any]:
        """The judge's P(A) among A and B at the winner token, when the reply carries logprobs."""
        p_a = winner_probability(completion)
        return {} if p_a is None else {"p_a": round(p_a, 6)}


_WINNER_OPEN = re.compile(r'"winner"\s*:\s*"$')
_WINNER_FIELD = re.compile(r'"winner"\s*:\s*"(A|B|tie)"')


def winner_probability(completion: Completion) -> float | None:
    """P(A) / (P(A) + P(B)) at the token that writes the winner, from the reply's top logprobs; None without them."""
    tokens = completion.logprobs or []
    pieces = "".join(t.token for t in tokens)
    # A backend may have written the reply's opening itself (a prefill): it is in the text, not in the tokens.
    before = completion.text[: len(completion.text) - len(pieces)] if completion.text.endswith(pieces) else ""
    for t in tokens:
        if _WINNER_OPEN.search(before):
            mass = {"A": 0.0, "B": 0.0}
            for top in t.top or [t]:
                letter = top.token.strip().strip('"')
                if letter in mass:
                    mass[letter] += math.exp(top.logprob)
            total = mass["A"] + mass["B"]
            return mass["A"] / total if total > 0 else None
        before += t.token
    return None


def pair_items(prompted: list[Prompted]) -> list[tuple[str, PairItem]]:
    """Every pair (i < j) of every input's responses, in both orders."""
    out = []
    for p in prompted:
        text = p.input.prompt_text()
        for i, j in combinations(range(len(p.responses)), 2):
            ri, rj = p.responses[i], p.responses[j]
            out.append((f"{p.where} pair {i}-{j}", PairItem(key=p.key, i=i, j=j, order="ab", prompt=text, response_a=ri, response_b=rj)))
            out.append((f"{p.where} pair {j}-{i}", PairItem(key=p.key, i=i, j=j, order="ba", prompt=text, response_a=rj, response_b=ri)))
    return out


Outcome = Literal["i", "j", "tie", "inconsistent", "missing"]


def resolve_shift(p_ab: float, p_ba: float, min_shift: float) -> Outcome:
    """One judge's outcome from its P(A) with i shown as A (`p_ab`) and with j shown as A (`p_ba`).

    A judge that favours a position raises P(A) in both orders alike; what moves when the order is
    swapped is its view of the responses: i wins when P(A) drops by more than `min_shift` once j is A.
    """
    shift = p_ab - p_ba
    return "i" if shift > min_shift else "j" if shift < -min_shift else "tie"


def resolve_swap(ab: str | None, ba: str | None) -> Outcome:
    """One judge's outcome for pair (i, j) from its verdict with i shown as A (`ab`) and with j shown as A (`ba`).

    Consistent means the same response wins in both orders (or both are ties); a missing verdict
    (the judge's reply never parsed) gives "missing".
    """
    if ab is None or ba is None:
        return "missing"
    if ab == "A" and ba == "B":
        return "i"
    if ab == "B" and ba == "A":
        return "j"
    if ab == "tie" and ba == "tie":
        return "tie"
    return "inconsistent"


def panel_decision(outcomes: list[Outcome]) -> tuple[Literal["i", "j"] | None, str | None]:
    """The panel's winner by strict majority of the consistent outcomes, or (None, reason)."""
    consistent = [o for o in outcomes if o in ("i", "j", "tie")]
    if not consistent:
        if all(o == "missing" for o in outcomes):
            return None, "no verdict: no judge gave a valid verdict in both orders"
        return None, f"inconsistent verdicts: the order decided ({', '.join(outcomes)})"
    (top, votes), *_ = Counter(consistent).most_common(1)
    if votes * 2 <= len(consistent):
        return None, f"no majority: {dict(Counter(consistent))}"
    if top == "tie":
        return None, f"tie: {votes} of {len(consistent)} consistent verdicts"
    return top, None


def pairwise_pairs(
    p: Prompted, verdicts: dict[tuple[int, int], dict[str, dict[str, Any]]], judges: list[str], provenance: Provenance,
    min_shift: float | None = None,
) -> tuple[list[PreferencePair], list[Reject]]:
    """One input's preference pairs from the panel's verdicts.

    `verdicts[(i, j)][judge]` holds that judge's `ab` and `ba` verdicts ({winner, reason, id, p_a?}) when it gave them.
    With `min_shift`, a judge whose verdicts carry P(A) in both orders is resolved by `resolve_shift`.
    """
    records, rejects = [], []
    if len(p.responses) < 2:
        return [], [Reject(task=p.key, reason=f"fewer than 2 candidate responses: {len(p.responses)}", input=_input(p))]
    prompt = p.input.prompt_value()
    for i, j in combinations(range(len(p.responses)), 2):
        by_judge = verdicts.get((i, j), {})
        outcomes = {}
        for judge in judges:
            v = by_judge.get(judge, {})
            p_ab, p_ba = (v.get(o, {}).get("p_a") for o in ("ab", "ba"))
            if min_shift is not None and p_ab is not None and p_ba is not None:
                outcomes[judge] = resolve_shift(p_ab, p_ba, min_shift)
            else:
                outcomes[judge] = resolve_swap(_winner(v.get("ab")), _winner(v.get("ba")))
        winner, why = panel_decision(list(outcomes.values()))
        detail = {judge: {**by_judge.get(judge, {}), "outcome": outcomes[judge]} for judge in judges}
        if winner is None:
            rejects.append(Reject(task=p.key, reason=f"{why} (pair {i}-{j})", input={**_input(p), "pair": [i, j], "verdicts": detail}))
            continue
        chosen, rejected = (i, j) if winner == "i" else (j, i)
        ids = sorted(v["id"] for d in by_judge.values() for v in d.values() if isinstance(v, dict) and "id" in v)
        records.append(
            PreferencePair(
                id=stable_id(p.key, "feedback-pairwise", i, j, ids),
                prompt=prompt,
                chosen=answer_value(prompt, p.responses[chosen]),
                rejected=answer_value(prompt, p.responses[rejected]),
                meta={
                    "mode": "pairwise",
                    "chosen_index": chosen,
                    "rejected_index": rejected,
                    "sources": {"chosen": p.sources[chosen], "rejected": p.sources[rejected]},
                    "votes": sum(1 for o in outcomes.values() if o == winner),
                    "judges": detail,
                },
                provenance=provenance,
            )
        )
    return records, rejects


def pairwise_records(
    prompted: list[Prompted], rows: list[dict[str, Any]], judges: list[str], provenance: Provenance, min_shift: float | None = None
) -> tuple[list[PreferencePair], list[Reject]]:
    """Every input's pairs from the panel's verdict judgments (rows of every judge's stage); `min_shift`: see pairwise_pairs."""
    grouped: dict[str, dict[tuple[int, int], dict[str, dict[str, Any]]]] = {}
    for row in rows:
        it = row["item"]
        pair = grouped.setdefault(row["key"], {}).setdefault((it["i"], it["j"]), {})
        pair.setdefault(row["judge"], {})[it["order"]] = {**row["value"], "id": row["id"]}
    records, rejects = [], []
    for p in prompted:
        made, rej = pairwise_pairs(p, grouped.get(p.key, {}), judges, provenance.model_copy(update={"task": p.key}), min_shift)
        records += made
        rejects += rej
    return records, rejects


def _winner(v: dict[str, Any] | None) -> str | None:
    return v.get("winner") if v else None


def _input(p: Prompted) -> dict[str, Any]:
    return {**p.input.model_dump(mode="json", exclude_none=True), "responses": p.responses}

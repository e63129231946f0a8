"""Rate mode (UltraFeedback-style): each response scored 1-10 per aspect with a rationale; best vs worst."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from synth.generators.feedback.base import (
    JudgeGenerator,
    Prompted,
    answer_value,
    mean,
    pick_best_worst,
)
from synth.records import Message, PreferencePair, Provenance, Reject, stable_id
from synth.structured import parse_model

DEFAULT_ASPECTS = ["helpfulness", "honesty", "instruction-following", "truthfulness"]


class AspectRating(BaseModel):
    """One aspect's score and why."""

    model_config = ConfigDict(extra="forbid")

    rating: float = Field(ge=1, le=10, description="1 (very poor) to 10 (excellent).")
    rationale: str = Field(description="One sentence saying why.")


@lru_cache(maxsize=32)
def rating_model(aspects: tuple[str, ...]) -> type[BaseModel]:
    """The reply model for these aspects: one AspectRating per aspect, keyed by the aspect's name."""
    fields: dict[str, Any] = {}
    for aspect in aspects:
        name = "f_" + re.sub(r"\W", "_", aspect)
        fields[name] = (AspectRating, Field(alias=aspect))
    # Extra keys (an "overall" a judge adds unasked) are ignored rather than failing the reply.
    return create_model("Rating", __config__=ConfigDict(extra="ignore", populate_by_name=True), **fields)


def parse_rating(text: str, aspects: list[str] | tuple[str, ...]) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """({aspect: {rating, rationale}}, None) for a valid reply, else (None, why)."""
    model, why = parse_model(text, rating_model(tuple(aspects)))
    if model is None:
        return None, why
    return model.model_dump(mode="json", by_alias=True), None


def overall(rating: dict[str, dict[str, Any]]) -> float:
    """One judge's overall score for a response: the mean of its aspect ratings."""
    return mean(float(v["rating"]) for v in rating.values())


class RateItem(BaseModel):
    """One response of one input, to be rated."""

    model_config = ConfigDict(extra="forbid")

    key: str
    index: int
    prompt: str
    response: str


class RateGenerator(JudgeGenerator):
    """Asks a judge to rate one response per request, on every aspect."""

    method = "feedback-rate"
    input_model = RateItem
    what = "rating"

    def __init__(self, params, teacher_name: str, template, aspects: list[str]):
        self.aspects = list(aspects)
        super().__init__(params, teacher_name, template, reply_model=rating_model(tuple(self.aspects)))
        # The aspects shape the reply: they belong in every record's parameters and id.
        self._params_json = {**self._params_json, "aspects": self.aspects}

    def messages(self, item: RateItem, where: str) -> list[Message]:
        """The rating template filled with the prompt, the response and the aspects."""
        text = self.template.render(where, prompt=item.prompt, response=item.response, aspects=self.aspects)
        return [Message(role="user", content=text)]


def rate_items(prompted: list[Prompted], min_responses: int = 2) -> list[tuple[str, RateItem]]:
    """One item per response of every input that has at least `min_responses` (a pair needs two)."""
    return [
        (f"{p.where} response {i}", RateItem(key=p.key, index=i, prompt=p.input.prompt_text(), response=r))
        for p in prompted
        if len(p.responses) >= min_responses
        for i, r in enumerate(p.responses)
    ]


@dataclass
class JudgeRating:
    """One judge's rating of one response."""

    judge: str
    rating: dict[str, dict[str, Any]]
    judgment: str = ""

    @property
    def overall(self) -> float:
        """Mean of the aspects."""
        return overall(self.rating)


def panel_scores(ratings: dict[int, list[JudgeRating]]) -> dict[int, float]:
    """Per response, the mean over judges of each judge's overall (responses no judge rated are left out)."""
    return {i: mean(r.overall for r in rs) for i, rs in ratings.items() if rs}


def rated_pair(
    p: Prompted, ratings: dict[int, list[JudgeRating]], min_margin: float, provenance: Provenance
) -> tuple[PreferencePair | None, Reject | None]:
    """The best-vs-worst pair of one input from the panel's ratings, or a reject saying why not."""
    if len(p.responses) < 2:
        return None, Reject(task=p.key, reason=f"fewer than 2 candidate responses: {len(p.responses)}", input=_input(p))
    scores = panel_scores(ratings)
    best, worst, why = pick_best_worst(scores, min_margin)
    if why is not None:
        return None, Reject(task=p.key, reason=why, input=_input(p))
    prompt = p.input.prompt_value()
    meta = {
        "mode": "rate",
        "chosen_index": best,
        "rejected_index": worst,
        "responses": [
            {
                "index": i,
                "source": p.sources[i],
                "overall": scores.get(i),
                "judges": {r.judge: r.rating for r in ratings.get(i, [])},
            }
            for i in range(len(p.responses))
        ],
    }
    judgments = sorted(r.judgment for rs in ratings.values() for r in rs)
    pair = PreferencePair(
        id=stable_id(p.key, "feedback-rate", best, worst, judgments),
        prompt=prompt,
        chosen=answer_value(prompt, p.responses[best]),
        rejected=answer_value(prompt, p.responses[worst]),
        score_chosen=scores[best],
        score_rejected=scores[worst],
        meta=meta,
        provenance=provenance,
    )
    return pair, None


def ratings_by_key(rows: list[dict[str, Any]]) -> dict[str, dict[int, list[JudgeRating]]]:
    """Rating judgments (rows of every judge's stage, in panel order) grouped by input key and response index."""
    out: dict[str, dict[int, list[JudgeRating]]] = {}
    for row in rows:
        out.setdefault(row["key"], {}).setdefault(row["item"]["index"], []).append(JudgeRating(row["judge"], row["value"], row["id"]))
    return out


def rate_records(prompted: list[Prompted], rows: list[dict[str, Any]], min_margin: float, provenance: Provenance) -> tuple[list[PreferencePair], list[Reject]]:
    """Every input's best-vs-worst pair from the panel's rating judgments, or its reject."""
    grouped = ratings_by_key(rows)
    records, rejects = [], []
    for p in prompted:
        pair, reject = rated_pair(p, grouped.get(p.key, {}), min_margin, provenance.model_copy(update={"task": p.key}))
        records += [pair] if pair else []
        rejects += [reject] if reject else []
    return records, rejects


def _input(p: Prompted) -> dict[str, Any]:
    return {**p.input.model_dump(mode="json", exclude_none=True), "responses": p.responses}

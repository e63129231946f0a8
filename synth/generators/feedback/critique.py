"""Critique mode: the judge critiques a response, scores it and writes a corrected one.

Every valid critique becomes a Critique record; per response, the first judge (in panel
order) that wrote one also gives an SFT example (prompt → corrected) and a preference
pair (corrected chosen over the original), each kind in its own file.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth.generators.feedback.base import JudgeGenerator, Prompted, answer_value, mean
from synth.records import (
    Critique,
    Message,
    PreferencePair,
    Provenance,
    Reject,
    SFTExample,
    stable_id,
)
from synth.structured import parse_model


class CritiqueReply(BaseModel):
    """What the judge returns: the critique, a 1-10 score of the original, and the corrected response."""

    model_config = ConfigDict(extra="ignore")

    critique: str = Field(min_length=1, description="What is wrong or missing.")
    score: float = Field(ge=1, le=10, description="The original response's quality, 1 to 10.")
    corrected: str = Field(min_length=1, description="The full corrected response.")

    @field_validator("critique", "corrected")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


def parse_critique(text: str) -> tuple[CritiqueReply | None, str | None]:
    """(reply, None) for a valid reply, else (None, why)."""
    return parse_model(text, CritiqueReply)


class CritiqueItem(BaseModel):
    """One response of one input, to be critiqued."""

    model_config = ConfigDict(extra="forbid")

    key: str
    index: int
    prompt: str
    response: str


class CritiqueGenerator(JudgeGenerator):
    """Asks a judge for a critique, a score and a corrected response, one response per request."""

    method = "feedback-critique"
    input_model = CritiqueItem
    reply_model = CritiqueReply
    what = "critique"

    def messages(self, item: CritiqueItem, where: str) -> list[Message]:
        """The critique template filled with the prompt and the response."""
        return [Message(role="user", content=self.template.render(where, prompt=item.prompt, response=item.response))]


def critique_items(prompted: list[Prompted]) -> list[tuple[str, CritiqueItem]]:
    """One item per response of every input."""
    return [
        (f"{p.where} response {i}", CritiqueItem(key=p.key, index=i, prompt=p.input.prompt_text(), response=r))
        for p in prompted
        for i, r in enumerate(p.responses)
    ]


def critique_records(
    p: Prompted, critiques: dict[int, list[tuple[str, str, dict[str, Any]]]], provenance: Provenance
) -> tuple[list[Critique], list[SFTExample], list[PreferencePair], list[Reject]]:
    """One input's records from `critiques[index]` = [(judge, judgment id, reply)] in panel order."""
    crits, sft, pairs, rejects = [], [], [], []
    if not p.responses:
        return [], [], [], [Reject(task=p.key, reason="no candidate responses", input=_input(p))]
    prompt = p.input.prompt_value()
    for index, response in enumerate(p.responses):
        found = critiques.get(index, [])
        for judge, jid, reply in found:
            crits.append(
                Critique(
                    id=stable_id(p.key, "feedback-critique", index, jid),
                    prompt=prompt,
                    response=response,
                    critique=reply["critique"],
                    corrected=reply["corrected"],
                    score=reply["score"],
                    meta={"judge": judge, "index": index, "source": p.sources[index]},
                    provenance=provenance,
                )
            )
        if not found:
            continue  # every judge's reply was rejected already, with its reason
        judge, jid, first = found[0]
        score = mean(r["score"] for _, _, r in found)
        meta = {
            "mode": "critique",
            "index": index,
            "source": p.sources[index],
            "judge": judge,
            "critique": first["critique"],
            "scores": {j: r["score"] for j, _, r in found},
        }
        base = stable_id(p.key, "feedback-critique", index, jid)
        completion = answer_value(prompt, first["corrected"])
        sft.append(SFTExample(id=stable_id(base, "sft"), prompt=prompt, completion=completion, meta=meta, provenance=provenance))
        if first["corrected"].strip() == response.strip():
            rejects.append(Reject(task=p.key, reason=f"corrected equals the original: response {index}, no preference pair", input=_input(p)))
            continue
        pairs.append(
            PreferencePair(
                id=stable_id(base, "pair"),
                prompt=prompt,
                chosen=completion,
                rejected=answer_value(prompt, response),
                score_rejected=score,
                meta=meta,
                provenance=provenance,
            )
        )
    return crits, sft, pairs, rejects


def all_critique_records(prompted: list[Prompted], rows: list[dict[str, Any]], judges: list[str], provenance: Provenance):
    """Every input's (critiques, SFT examples, pairs, rejects) from the panel's critique judgments, judges in panel order."""
    grouped: dict[str, dict[int, list[tuple[str, str, dict[str, Any]]]]] = {}
    for row in sorted(rows, key=lambda r: judges.index(r["judge"])):
        grouped.setdefault(row["key"], {}).setdefault(row["item"]["index"], []).append((row["judge"], row["id"], row["value"]))
    out: tuple[list, list, list, list] = ([], [], [], [])
    for p in prompted:
        for kept, made in zip(out, critique_records(p, grouped.get(p.key, {}), provenance.model_copy(update={"task": p.key}))):
            kept.extend(made)
    return out


def _input(p: Prompted) -> dict[str, Any]:
    return {**p.input.model_dump(mode="json", exclude_none=True), "responses": p.responses}

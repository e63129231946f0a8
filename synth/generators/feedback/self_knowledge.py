"""Self-knowledge: the student samples several answers, scores them itself, keeps the best (maybe refined).

Scoring is either self-reward (the student rates its own samples with the rate mode's
reply model, `rate.RateGenerator` on the `self/reward` template) or
self-consistency (samples whose extracted final answers agree score higher; answer
extraction and comparison come from `synth.filters.verify`). Refinement asks the student
to critique its best answer (`self/critique`), then to rewrite it given that critique
(`self/refine`): plain text, so even a small student's reply is usable.
"""

from __future__ import annotations

from typing import Any, Sequence

from synth.filters.verify import Checker, extract_answer, group_answers
from synth.generators.feedback.base import Prompted, answer_value, pick_best_worst
from synth.records import PreferencePair, Provenance, Reject, SFTExample, stable_id


def consistency_scores(responses: Sequence[str], checker: Checker) -> tuple[dict[int, float], list[str | None]]:
    """Per sample, how many samples (itself included) reached the same final answer; 0 without one."""
    answers = [extract_answer(r, number_fallback=True) for r in responses]
    stated = [i for i, a in enumerate(answers) if a is not None]
    scores = {i: 0.0 for i in range(len(responses))}
    for group in group_answers([answers[i] for i in stated], checker):
        for k in group:
            scores[stated[k]] = float(len(group))
    return scores, answers


def best_index(scores: dict[int, float]) -> int | None:
    """The highest-scored sample (the first of equals), or None when nothing scored above 0."""
    if not scores or max(scores.values()) <= 0:
        return None
    return min(scores, key=lambda i: (-scores[i], i))


def refined_answer(refine: dict[str, Any] | None) -> tuple[str | None, str]:
    """(the rewrite to use, status) from the refine stage's output for one input; None keeps the original."""
    if refine is None:
        return None, "not refined"
    text = (refine.get("refined") or "").strip()
    if not text:
        return None, "refinement empty"
    if refine.get("finish_reason") == "length":
        return None, "refinement truncated"
    return text, "refined"


def self_records(
    p: Prompted,
    scores: dict[int, float],
    details: list[dict[str, Any]],
    min_margin: float,
    provenance: Provenance,
    refine: dict[str, Any] | None = None,
    min_votes: int | None = None,
) -> tuple[list[SFTExample], list[PreferencePair], list[Reject]]:
    """One input's SFT example (the best sample, or its refinement) and best-vs-worst pair, with every score in meta.

    `scores` holds the scored samples only (a sample whose self-rating never parsed is left out);
    `details[i]` is what is known about sample i (its score, ratings or extracted answer). With
    `min_votes` (self-consistency, where a score is a vote count) the best must have that many.
    """
    if not scores:
        why = "no sample could be scored" if p.responses else "no samples"
        return [], [], [Reject(task=p.key, reason=f"{why}: {len(p.responses)} samples", input=_input(p))]
    if max(scores.values()) <= 0:
        return [], [], [Reject(task=p.key, reason="no final answer in any sample", input=_input(p))]
    if min_votes is not None and max(scores.values()) < min_votes:
        top = int(max(scores.values()))
        reason = f"no agreement: the most common final answer has {top} of {len(p.responses)} votes (min {min_votes})"
        return [], [], [Reject(task=p.key, reason=reason, input=_input(p))]
    best = best_index(scores)
    prompt = p.input.prompt_value()
    rewrite, status = refined_answer(refine)
    meta = {
        "best_index": best,
        "samples": [{"index": i, "score": scores.get(i), **details[i]} for i in range(len(p.responses))],
        "refine": status,
    }
    if refine is not None:
        meta["critique"] = refine.get("critique")
        if rewrite is not None:
            meta["original"] = p.responses[best]
    final = rewrite if rewrite is not None else p.responses[best]
    base = stable_id(p.key, "self", best, provenance.params, status, final)
    sft = [SFTExample(id=stable_id(base, "sft"), prompt=prompt, completion=answer_value(prompt, final), meta=meta, provenance=provenance)]
    best_, worst, why = pick_best_worst(scores, min_margin)
    if why is not None:
        return sft, [], [Reject(task=p.key, reason=f"{why} (no preference pair; the SFT example is kept)", input=_input(p))]
    pair = PreferencePair(
        id=stable_id(base, "pair", worst),
        prompt=prompt,
        chosen=answer_value(prompt, p.responses[best_]),
        rejected=answer_value(prompt, p.responses[worst]),
        score_chosen=scores[best_],
        score_rejected=scores[worst],
        meta={**meta, "worst_index": worst},
        provenance=provenance,
    )
    return sft, [pair], []


def _input(p: Prompted) -> dict[str, Any]:
    return {**p.input.model_dump(mode="json", exclude_none=True), "responses": p.responses}

"""`distill self`: consistency scoring, choosing and refining the best sample, and the command on the embedded student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synth.filters.verify import exact_checker, numeric_checker
from synth.generators.feedback.base import FeedbackInput, Prompted
from synth.generators.feedback.self_knowledge import (
    best_index,
    consistency_scores,
    refined_answer,
    self_records,
)
from synth.records import Provenance

PROV = Provenance(teacher="t", method="self-test", params={"samples": 4}, task="k")


def test_consistency_scores_count_agreeing_final_answers():
    responses = ["So the answer is 5.\nAnswer: 5", "2 + 3 = 5.0", "#### 6", "I do not know.", "Answer: five"]
    scores, answers = consistency_scores(responses, numeric_checker)
    assert answers[:3] == ["5", "5.0", "6"] and answers[3] is None
    assert scores == {0: 2.0, 1: 2.0, 2: 1.0, 3: 0.0, 4: 1.0}
    exact, _ = consistency_scores(["Answer: Paris", "answer: paris.", "Answer: Lyon"], exact_checker)
    assert exact == {0: 2.0, 1: 2.0, 2: 1.0}


def test_best_index_and_refined_answer():
    assert best_index({0: 1.0, 1: 3.0, 2: 3.0}) == 1
    assert best_index({0: 0.0}) is None and best_index({}) is None
    assert refined_answer(None) == (None, "not refined")
    assert refined_answer({"refined": "  "}) == (None, "refinement empty")
    assert refined_answer({"refined": "Better.", "finish_reason": "length"}) == (None, "refinement truncated")
    assert refined_answer({"refined": " Better. ", "finish_reason": "stop"}) == ("Better.", "refined")


def prompted(responses, messages=False) -> Prompted:
    item = FeedbackInput(messages=[{"role": "user", "content": "Q?"}]) if messages else FeedbackInput(prompt="Q?")
    return Prompted(key="k", where="in.jsonl:1", input=item, responses=list(responses), sources=["student"] * len(responses))


def test_self_records_best_sft_and_best_vs_worst_pair_with_every_score():
    p = prompted(["ok", "best", "worst"])
    details = [{"answer": "a"}, {"answer": "b"}, {"answer": None}]
    sft, pairs, rejects = self_records(p, {0: 5.0, 1: 8.0, 2: 2.0}, details, 1.0, PROV)
    assert not rejects and sft[0].completion == "best" and sft[0].meta["best_index"] == 1
    assert [s["score"] for s in sft[0].meta["samples"]] == [5.0, 8.0, 2.0] and sft[0].meta["samples"][2]["answer"] is None
    (pair,) = pairs
    assert (pair.chosen, pair.rejected, pair.score_chosen, pair.score_rejected) == ("best", "worst", 8.0, 2.0)
    assert self_records(p, {0: 5.0, 1: 8.0, 2: 2.0}, details, 1.0, PROV)[0][0].id == sft[0].id, "ids are stable"

    refined = self_records(p, {0: 5.0, 1: 8.0, 2: 2.0}, details, 1.0, PROV, {"critique": "Too short.", "refined": "best, longer", "finish_reason": "stop"})
    assert refined[0][0].completion == "best, longer" and refined[0][0].meta["original"] == "best"
    assert refined[0][0].meta["critique"] == "Too short." and refined[1][0].chosen == "best"
    assert refined[0][0].id != sft[0].id

    narrow, pairs, rejects = self_records(p, {0: 5.0, 1: 5.5}, details, 1.0, PROV)
    assert narrow and not pairs and rejects[0].reason.startswith("margin below minimum")
    conv, pairs, _ = self_records(prompted(["a", "b"], messages=True), {0: 1.0, 1: 3.0}, [{}, {}], 1.0, PROV)
    assert conv[0].completion[0].content == "b" and pairs[0].chosen[0].role == "assistant"


@pytest.mark.parametrize(
    "scores, min_votes, reason",
    [({}, None, "no sample could be scored"), ({0: 0.0, 1: 0.0}, 2, "no final answer in any sample"), ({0: 1.0, 1: 1.0}, 2, "no agreement")],
)
def test_self_records_rejects_say_why(scores, min_votes, reason):
    sft, pairs, rejects = self_records(prompted(["a", "b"]), scores, [{}, {}], 1.0, PROV, None, min_votes)
    assert not sft and not pairs and rejects[0].reason.startswith(reason)


def distill(*args: str, cache: Path) -> subprocess.CompletedProcess:
    # One torch thread: on a busy 2-core machine two spinning OpenMP threads ran the tiny model ~9x slower.
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=600)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
    return path


def test_self_reward_end_to_end_on_the_embedded_student(tmp_path):
    inputs = write_prompts(tmp_path / "in.jsonl", ["What is 2 + 3?", "Name a primary color."])
    out, cache = tmp_path / "self.jsonl", tmp_path / "cache"
    args = ["self", "--input", str(inputs), "--output", str(out), "--samples", "2", "--max-tokens", "16",
            "--judge-max-tokens", "32", "--judge-temperature", "0", "--aspects", "helpfulness", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    samples = rows(tmp_path / "self.work" / "samples.jsonl")
    assert len(samples) + len(rows(tmp_path / "self.work" / "samples.rejects.jsonl")) == 4
    ratings = rows(tmp_path / "self.work" / "self-reward.jsonl")
    rejects = rows(tmp_path / "self.rejects.jsonl")
    allowed = {"unparsable rating", "truncated rating", "refused to judge", "no sample could be scored", "margin below minimum", "fewer than 2 scored responses", "empty response"}
    assert all(r["reason"].split(":")[0] in allowed for r in rejects), [r["reason"] for r in rejects]
    assert len(ratings) + sum(r["reason"].split(":")[0] in ("unparsable rating", "truncated rating", "refused to judge") for r in rejects) == len(samples)
    sft = rows(out)
    for record in sft:
        assert record["kind"] == "sft" and record["meta"]["refine"] == "not refined"
        assert any(s["score"] is not None and "ratings" in s for s in record["meta"]["samples"])
    assert len(sft) + sum(r["reason"].startswith("no sample could be scored") for r in rejects) == 2
    assert {r["kind"] for r in rows(tmp_path / "self.pairs.jsonl")} <= {"preference"}

    before = sorted(out.read_text().splitlines())
    again = distill(*args, cache=cache)
    assert again.returncode == 0 and "teachers: 0 requests sent" in again.stdout, again.stdout
    assert sorted(out.read_text().splitlines()) == before


def test_self_consistency_with_refine_end_to_end(tmp_path):
    inputs = write_prompts(tmp_path / "in.jsonl", ["Count from 1 to 5."])
    out, cache = tmp_path / "sc.jsonl", tmp_path / "cache"
    args = ["self", "--judge-by", "consistency", "--min-votes", "1", "--refine", "--input", str(inputs), "--output", str(out),
            "--samples", "2", "--max-tokens", "24", "--refine-max-tokens", "24", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    work = tmp_path / "sc.work"
    assert not (work / "self-reward.jsonl").exists(), "self-consistency asks for no ratings"
    sft = rows(out)
    assert sft, "a counting answer always states a number"
    critiques, rewrites = rows(work / "self-critique.jsonl"), rows(work / "self-refine.jsonl")
    assert len(critiques) == len(rewrites) == len(sft)
    for record in sft:
        assert record["meta"]["refine"] in {"refined", "refinement empty", "refinement truncated"} and "critique" in record["meta"]
        assert all("answer" in s for s in record["meta"]["samples"]) and record["meta"]["samples"][record["meta"]["best_index"]]["score"] >= 1
        if record["meta"]["refine"] == "refined":
            assert record["completion"] in {r["messages"][-1]["content"].strip() for r in rewrites}
            assert record["meta"]["original"] in {s["completion"] for s in rows(work / "samples.jsonl")}
    before = sorted(out.read_text().splitlines())
    again = distill(*args, cache=cache)
    assert again.returncode == 0 and "teachers: 0 requests sent" in again.stdout, again.stdout
    assert sorted(out.read_text().splitlines()) == before

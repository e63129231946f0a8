"""`distill feedback`: parsers on recorded replies, swap consistency, panel aggregation, and the command end to end.

Judges here are the embedded SmolLM2 (it rarely writes valid JSON: its replies must end as
rejects with reasons), llama.cpp's server (grammar-constrained JSON) and the echo server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import build_parser
from distill.config_flags import load_config
from synth.errors import ConfigError
from synth.generators.feedback.base import (
    FeedbackInput,
    Judgment,
    Prompted,
    assemble,
    candidates_from_rows,
    failure_reason,
    pick_best_worst,
)
from synth.generators.feedback.critique import (
    critique_records,
    parse_critique,
)
from synth.generators.feedback.pairwise import (
    pairwise_pairs,
    panel_decision,
    parse_verdict,
    resolve_swap,
)
from synth.generators.feedback.rate import (
    JudgeRating,
    RateGenerator,
    RateItem,
    parse_rating,
    rated_pair,
)
from synth.pipelines.feedback import FeedbackSettings
from synth.pipelines.stages import PIPELINE_FIELDS, read_inputs
from synth.prompts import load_template
from synth.records import Provenance
from synth.teachers.base import ChatResponse, Completion, SamplingParams
from tests.fault_server import fault_server

ASPECTS = ["helpfulness", "honesty"]
GOOD_RATING = '{"helpfulness": {"rating": 8, "rationale": "Clear."}, "honesty": {"rating": 9, "rationale": "Hedged."}}'
PROV = Provenance(teacher="t", method="feedback-test", task="")


# -- parsers on recorded replies -----------------------------------------------------------------

@pytest.mark.parametrize(
    "reply, why",
    [
        (GOOD_RATING, None),
        (f"Here is my evaluation:\n```json\n{GOOD_RATING}\n```\nThanks.", None),
        (f"Sure! {GOOD_RATING} Hope that helps.", None),
        ('{"helpfulness": {"rating": "8", "rationale": "ok"}, "honesty": {"rating": 7.5, "rationale": "ok"}, "overall": 8}', None),
        # Truncated: the only balanced object left is an inner one, which is not a rating.
        ('{"helpfulness": {"rating": 8, "rationale": "Clear."}, "honesty": {"rating": 9', "Field required"),
        ("I'm sorry, but I can't evaluate this response.", "no JSON found"),
        ('{"helpfulness": {"rating": 11, "rationale": "x"}, "honesty": {"rating": 5, "rationale": "y"}}', "less than or equal to 10"),
        ('{"helpfulness": {"rating": 0, "rationale": "x"}, "honesty": {"rating": 5, "rationale": "y"}}', "greater than or equal to 1"),
        ('{"helpfulness": {"rating": 8, "rationale": "x"}}', "field 'honesty': Field required"),
        ('{"helpfulness": {"rating": "eight", "rationale": "x"}, "honesty": {"rating": 5, "rationale": "y"}}', "helpfulness.rating"),
        ('{"helpfulness": {"rating": 8}, "honesty": {"rating": 5, "rationale": "y"}}', "helpfulness.rationale"),
    ],
)
def test_parse_rating_on_recorded_replies(reply, why):
    rating, problem = parse_rating(reply, ASPECTS)
    if why is None:
        assert problem is None and set(rating) == set(ASPECTS)
        assert all(1 <= v["rating"] <= 10 and isinstance(v["rationale"], str) for v in rating.values())
    else:
        assert rating is None and why in problem


@pytest.mark.parametrize(
    "reply, winner, why",
    [
        ('{"winner": "A", "reason": "More accurate."}', "A", None),
        ('```json\n{"winner": "b", "reason": "Shorter and right."}\n```', "B", None),
        ('{"winner": "[[A]]", "reason": "x"}', "A", None),
        ('{"winner": "Response B", "reason": "x"}', "B", None),
        ('{"winner": "Tie", "reason": "Both fine."}', "tie", None),
        ('{"winner": "C", "reason": "x"}', None, "winner"),
        ('{"winner": "both", "reason": "x"}', None, "winner"),
        ('{"winner": "A"}', None, "reason"),
        ('The answer is "tie"', None, "no JSON found"),
        ('{"winner": "A", "reas', None, "no JSON found"),
        ("I cannot compare these responses.", None, "no JSON found"),
    ],
)
def test_parse_verdict_on_recorded_replies(reply, winner, why):
    verdict, problem = parse_verdict(reply)
    if why is None:
        assert problem is None and verdict.winner == winner
    else:
        assert verdict is None and why in problem


@pytest.mark.parametrize(
    "reply, why",
    [
        ('{"critique": "Wrong sum.", "score": 3, "corrected": "2 + 3 = 5."}', None),
        ('Review:\n```json\n{"critique": "ok", "score": "7", "corrected": "Paris."}\n```', None),
        ('{"critique": "Wrong sum.", "score": 3, "corrected": "   "}', "blank"),
        ('{"critique": "Wrong sum.", "score": 12, "corrected": "5"}', "less than or equal to 10"),
        ('{"critique": "Wrong sum.", "score": 3}', "corrected"),
        ('{"critique": "Wrong sum.", "score": 3, "corrected": "2 + 3 =', "no JSON found"),
        ("Sorry, I can't help with that.", "no JSON found"),
    ],
)
def test_parse_critique_on_recorded_replies(reply, why):
    reply_, problem = parse_critique(reply)
    if why is None:
        assert problem is None and reply_.corrected.strip() and 1 <= reply_.score <= 10
    else:
        assert reply_ is None and why in problem


@pytest.mark.parametrize(
    "text, finish, category",
    [
        ('{"helpfulness": {"rat', "length", "truncated rating"),
        ("I'm sorry, I can't rate that.", "stop", "refused to judge"),
        ("抱歉，我无法评价。", "stop", "refused to judge"),
        ("The response is good.", "stop", "unparsable rating"),
    ],
)
def test_failure_reasons_name_the_kind_of_failure(text, finish, category):
    reason = failure_reason("rating", "judge-x", 1, Completion(text=text, finish_reason=finish), "no JSON found in the reply")
    assert reason.startswith(category + ": judge judge-x, sample 1")


def rate_task(temperature: float = 0.3):
    gen = RateGenerator(SamplingParams(temperature=temperature, max_tokens=64, seed=0), "judge-x", load_template("feedback/rate"), ASPECTS)
    task = gen.make_task(RateItem(key="k1", index=1, prompt="What is 2 + 3?", response="5"), "in.jsonl:1 response 1")
    return gen, task


def test_judge_parse_resamples_once_then_rejects_with_raw_text():
    gen, task = rate_task()
    assert task.request.params.json_schema["required"] == ASPECTS, "the reply schema goes to the backend"
    assert "What is 2 + 3?" in task.request.messages[-1].content and "honesty" in task.request.messages[-1].content
    bad = ChatResponse(completions=[Completion(text="Looks fine to me.", finish_reason="stop")])
    first = gen.parse(task, task.request, bad, final=False)
    assert first.resample == 1 and not first.records and not first.rejects
    last = gen.parse(task, task.request.model_copy(update={"sample_offset": 1}), bad, final=True)
    (reject,) = last.rejects
    assert reject.reason.startswith("unparsable rating: judge judge-x, sample 1") and reject.raw == ["Looks fine to me."]
    assert reject.input["key"] == "k1"

    good = gen.parse(task, task.request, ChatResponse(completions=[Completion(text=GOOD_RATING, finish_reason="stop")]), final=False)
    (record,) = good.records
    assert isinstance(record, Judgment) and record.key == "k1" and record.item == {"index": 1}
    assert record.value["honesty"]["rating"] == 9 and record.provenance.params["aspects"] == ASPECTS
    assert gen.parse(task, task.request, ChatResponse(completions=[Completion(text=GOOD_RATING)]), final=False).records[0].id == record.id


# -- swap consistency and the panel ----------------------------------------------------------------

@pytest.mark.parametrize(
    "ab, ba, outcome",
    [("A", "B", "i"), ("B", "A", "j"), ("tie", "tie", "tie"), ("A", "A", "inconsistent"), ("B", "B", "inconsistent"),
     ("A", "tie", "inconsistent"), (None, "B", "missing"), ("A", None, "missing")],
)
def test_resolve_swap(ab, ba, outcome):
    assert resolve_swap(ab, ba) == outcome


@pytest.mark.parametrize(
    "outcomes, winner, reason",
    [
        (["i"], "i", None),
        (["i", "i", "inconsistent"], "i", None),
        (["j", "j", "i"], "j", None),
        (["i", "j", "inconsistent"], None, "no majority"),
        (["tie", "tie", "i"], None, "tie"),
        (["inconsistent", "missing"], None, "inconsistent verdicts"),
        (["missing", "missing"], None, "no verdict"),
    ],
)
def test_panel_decision_is_a_strict_majority_of_consistent_verdicts(outcomes, winner, reason):
    got, why = panel_decision(outcomes)
    assert got == winner
    assert (why is None) if reason is None else why.startswith(reason)


def prompted(responses, prompt="Q?", messages=None) -> Prompted:
    item = FeedbackInput(prompt=prompt) if messages is None else FeedbackInput(messages=messages)
    return Prompted(key="key1", where="in.jsonl:1", input=item, responses=list(responses), sources=[f"s{i}" for i in range(len(responses))])


def test_pairwise_pairs_keep_consistent_majorities_and_explain_the_rest():
    p = prompted(["r0", "r1", "r2"])
    v = lambda ab, ba: {"ab": {"winner": ab, "reason": "x", "id": f"{ab}1"}, "ba": {"winner": ba, "reason": "y", "id": f"{ba}2"}}  # noqa: E731
    verdicts = {
        (0, 1): {"J1": v("B", "A"), "J2": v("B", "A")},  # both judges: 1 beats 0
        (0, 2): {"J1": v("A", "A"), "J2": v("A", "A")},  # position bias in both
        (1, 2): {"J1": v("tie", "tie"), "J2": v("tie", "tie")},
    }
    pairs, rejects = pairwise_pairs(p, verdicts, ["J1", "J2"], PROV)
    (pair,) = pairs
    assert (pair.chosen, pair.rejected) == ("r1", "r0") and pair.meta["votes"] == 2
    assert pair.meta["judges"]["J1"]["outcome"] == "j" and pair.meta["sources"] == {"chosen": "s1", "rejected": "s0"}
    reasons = sorted(r.reason for r in rejects)
    assert reasons[0].startswith("inconsistent verdicts") and "(pair 0-2)" in reasons[0]
    assert reasons[1].startswith("tie") and "(pair 1-2)" in reasons[1]
    again, _ = pairwise_pairs(p, verdicts, ["J1", "J2"], PROV)
    assert again[0].id == pair.id, "ids are stable"


def test_rated_pair_averages_the_panel_and_needs_the_margin():
    p = prompted(["good", "bad", "meh"], messages=[{"role": "user", "content": "Q?"}])
    r = lambda judge, h, o: JudgeRating(judge, {"helpfulness": {"rating": h, "rationale": ""}, "honesty": {"rating": o, "rationale": ""}}, judge + str(h))  # noqa: E731
    ratings = {0: [r("J1", 9, 9), r("J2", 7, 7)], 1: [r("J1", 2, 4), r("J2", 4, 4)], 2: [r("J1", 5, 5)]}
    pair, reject = rated_pair(p, ratings, 1.0, PROV)
    assert reject is None and pair.score_chosen == 8.0 and pair.score_rejected == 3.5
    assert pair.chosen[0].content == "good" and pair.rejected[0].content == "bad"
    assert pair.prompt[0].content == "Q?", "a conversational prompt stays conversational"
    assert pair.meta["responses"][2]["judges"] == {"J1": ratings[2][0].rating} and pair.meta["responses"][1]["overall"] == 3.5
    none, why = rated_pair(p, ratings, 5.0, PROV)
    assert none is None and why.reason.startswith("margin below minimum")
    none, why = rated_pair(p, {0: ratings[0]}, 1.0, PROV)
    assert none is None and why.reason.startswith("fewer than 2 scored responses")
    assert rated_pair(prompted(["only"]), {}, 1.0, PROV)[1].reason.startswith("fewer than 2 candidate responses")


def test_pick_best_worst_breaks_ties_by_order():
    assert pick_best_worst({0: 5.0, 1: 9.0, 2: 9.0, 3: 1.0}, 1.0)[:2] == (1, 3)
    assert pick_best_worst({0: 5.0, 1: 5.5}, 1.0)[2].startswith("margin below minimum")


def test_critique_records_give_critiques_sft_and_pairs():
    p = prompted(["2 + 3 = 6", "5"])
    critiques = {
        0: [("J1", "id1", {"critique": "Wrong.", "score": 2.0, "corrected": "2 + 3 = 5"}), ("J2", "id2", {"critique": "Bad.", "score": 4.0, "corrected": "5"})],
        1: [("J1", "id3", {"critique": "Right.", "score": 10.0, "corrected": "5"})],
    }
    crits, sft, pairs, rejects = critique_records(p, critiques, PROV)
    assert len(crits) == 3 and {c.meta["judge"] for c in crits} == {"J1", "J2"}
    assert [s.completion for s in sft] == ["2 + 3 = 5", "5"]
    (pair,) = pairs
    assert (pair.chosen, pair.rejected, pair.score_rejected) == ("2 + 3 = 5", "2 + 3 = 6", 3.0)
    (reject,) = rejects
    assert reject.reason.startswith("corrected equals the original")


def test_assemble_keeps_order_and_sources_and_drops_repeats():
    a = FeedbackInput(prompt="Q1", responses=["x", " x "])
    b = FeedbackInput(prompt="Q2")
    rows = [
        {"meta": {"key": a.key(), "source": "teacher"}, "provenance": {"sample": 1}, "completion": "y"},
        {"meta": {"key": a.key(), "source": "teacher"}, "provenance": {"sample": 0}, "completion": "x"},
        {"meta": {"key": b.key(), "source": "student"}, "provenance": {"sample": 0}, "completion": ""},
    ]
    out = assemble([("f:1", a), ("f:2", b), ("f:3", a)], candidates_from_rows(rows))
    assert [p.where for p in out] == ["f:1", "f:2"], "the same input twice is judged once"
    assert out[0].responses == ["x", "y"] and out[0].sources == ["input", "teacher"]
    assert out[1].responses == []


# -- config and templates -------------------------------------------------------------------------

def test_config_file_and_flags(tmp_path):
    defaults = FeedbackSettings(input="i", output="o")
    assert defaults.mode == "rate" and defaults.judge == [] and defaults.teacher == "embedded"
    cfg = tmp_path / "fb.yaml"
    cfg.write_text("mode: pairwise\nmin_margin: 3\njudge: [embedded]\n")
    args = build_parser().parse_args(["feedback", "--input", "i", "--output", "o", "--config", str(cfg), "--min-margin", "2",
                                      "--judge", "hf:/a", "--judge", "openai:m@http://h/v1", "--temperatures", "0.2", "1.0"])
    config = load_config(args, FeedbackSettings, flags_only=PIPELINE_FIELDS)
    assert config.mode == "pairwise" and config.min_margin == 2 and config.temperatures == [0.2, 1.0]
    assert config.judge == ["hf:/a", "openai:m@http://h/v1"], "repeated --judge flags build the panel and override the file"
    assert config.input == Path("i") and config.output == Path("o") and config.limit is None
    cfg.write_text("mode: pairwise\nlimit: 3\n")
    with pytest.raises(ConfigError, match=r"fb\.yaml: key 'limit': unknown key"):
        load_config(args, FeedbackSettings, flags_only=PIPELINE_FIELDS)


@pytest.mark.parametrize("name", ["feedback/rate", "feedback/pairwise", "feedback/critique", "self/reward", "self/critique", "self/refine"])
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_template_renders_in_both_languages(name, lang):
    text = load_template(name, lang).render(prompt="PROMPT", response="RESP", response_a="AAA", response_b="BBB", critique="CRIT", aspects=ASPECTS)
    assert "PROMPT" in text and ("RESP" in text or "AAA" in text and "BBB" in text)


# -- end to end -----------------------------------------------------------------------------------

def distill(*args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # One torch thread: on a busy 2-core machine two spinning OpenMP threads ran the tiny model ~9x slower.
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_inputs(path: Path, with_responses: bool) -> Path:
    lines = [
        {"prompt": "What is 2 + 3?", **({"responses": ["2 + 3 = 5.", "It is 6."]} if with_responses else {})},
        {"messages": [{"role": "user", "content": "Name a primary color."}], **({"responses": ["Red.", "Banana."]} if with_responses else {})},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def stage_rows(work: Path, prefix: str, rejects: bool = False) -> list[dict]:
    """The records (or rejects) of the one stage file in `work` whose name starts with `prefix`."""
    (path,) = [p for p in work.glob(prefix + "*.jsonl") if p.name.endswith(".rejects.jsonl") == rejects]
    return rows(path)


def check_rejects(path: Path, allowed: set[str]) -> list[dict]:
    found = rows(path)
    for r in found:
        category = r["reason"].split(":", 1)[0]
        assert category in allowed, r["reason"]
        if category.startswith(("unparsable", "truncated", "refused")):
            assert r["raw"] and r["raw"][0] is not None, "a judge's unusable reply is kept"
    return found


JUDGE_FAILURES = {f"{kind} {what}" for kind in ("unparsable", "truncated") for what in ("rating", "verdict", "critique")} | {"refused to judge"}


def assert_rerun_is_free(args: list[str], out: Path, cache: Path, extra: list[Path] = ()) -> None:
    before = {p: sorted(p.read_text().splitlines()) for p in [out, *extra]}
    again = distill(*args, cache=cache)
    assert again.returncode == 0, again.stderr
    assert "teachers: 0 requests sent" in again.stdout, again.stdout
    assert {p: sorted(p.read_text().splitlines()) for p in before} == before, "a rerun writes the same records"


def test_rate_end_to_end_on_the_embedded_teacher(tmp_path):
    inputs = write_inputs(tmp_path / "in.jsonl", with_responses=False)
    out, cache = tmp_path / "rate.jsonl", tmp_path / "cache"
    args = ["feedback", "--mode", "rate", "--input", str(inputs), "--output", str(out), "--student", "embedded",
            "--candidates-per-source", "1", "--temperatures", "0.7", "--candidate-max-tokens", "16",
            "--judge-max-tokens", "40", "--judge-temperature", "0", "--aspects", "helpfulness", "honesty", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    work = tmp_path / "rate.work"
    cands = rows(work / "candidates-student.jsonl") + rows(work / "candidates-t0.7.jsonl")
    assert len(cands) == 4 and {c["meta"]["source"] for c in cands} == {"student embedded", "teacher T=0.7"}
    # Student and teacher are the same tiny model here: equal candidates are judged once.
    fates = {"margin below minimum", "fewer than 2 scored responses", "fewer than 2 candidate responses"}
    rejects = check_rejects(tmp_path / "rate.rejects.jsonl", JUDGE_FAILURES | fates)
    pairs = rows(out)
    for pair in pairs:
        assert pair["kind"] == "preference" and pair["score_chosen"] - pair["score_rejected"] >= 1.0
        assert all(r["judges"] or r["overall"] is None for r in pair["meta"]["responses"])
    final = [r for r in rejects if r["reason"].split(":")[0] in fates]
    assert len(pairs) + len(final) == 2, "each input ends as a pair or a reject saying why"
    assert f"wrote {len(pairs)} preference pairs" in result.stdout and "rejects:" in result.stdout
    assert_rerun_is_free(args, out, cache)


def test_pairwise_and_critique_end_to_end_on_the_embedded_teacher(tmp_path):
    inputs = write_inputs(tmp_path / "in.jsonl", with_responses=True)
    cache = tmp_path / "cache"
    out = tmp_path / "pw.jsonl"
    # One input per mode keeps the tiny model's CPU time down: --limit 1 takes the plain prompt here.
    args = ["feedback", "--mode", "pairwise", "--input", str(inputs), "--limit", "1", "--output", str(out), "--judge-max-tokens", "32", "--judge-temperature", "0", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    judged = stage_rows(tmp_path / "pw.work", "pairwise-judge1-")
    assert all(j["item"]["order"] in ("ab", "ba") and j["value"]["winner"] in ("A", "B", "tie") for j in judged)
    pair_fates = {"inconsistent verdicts", "tie", "no verdict", "no majority"}
    rejects = check_rejects(tmp_path / "pw.rejects.jsonl", JUDGE_FAILURES | pair_fates)
    assert len(rows(out)) + sum(r["reason"].split(":")[0] in pair_fates for r in rejects) == 1
    assert_rerun_is_free(args, out, cache)

    out = tmp_path / "cr.jsonl"
    conversational = tmp_path / "chat.jsonl"
    conversational.write_text(inputs.read_text().splitlines()[1] + "\n")
    args = ["feedback", "--mode", "critique", "--lang", "zh", "--input", str(conversational), "--output", str(out), "--judge-max-tokens", "48", "--judge-temperature", "0", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    sft, pairs = tmp_path / "cr.sft.jsonl", tmp_path / "cr.pairs.jsonl"
    assert {r["kind"] for r in rows(out)} <= {"critique"} and {r["kind"] for r in rows(sft)} <= {"sft"} and {r["kind"] for r in rows(pairs)} <= {"preference"}
    rejects = check_rejects(tmp_path / "cr.rejects.jsonl", JUDGE_FAILURES | {"corrected equals the original"})
    judge_rejects = [r for r in rejects if r["reason"].split(":")[0] in JUDGE_FAILURES]
    assert len(rows(out)) + len(judge_rejects) == 2, "every response is critiqued or rejected with a reason"
    assert all(r["prompt"][0]["role"] == "user" for r in rows(out) + rows(sft) + rows(pairs)), "a chat prompt stays a chat"
    assert_rerun_is_free(args, out, cache, [sft, pairs])


def test_echo_judge_over_http_resamples_rejects_and_reruns_free(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("What is 2 + 3?", "Name a color.")))
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with fault_server() as server:
        spec = f"openai:echo@{server.base_url}"
        args = ["feedback", "--input", str(inputs), "--output", str(out), "--student", spec, "--judge", spec, "--quiet"]
        result = distill(*args, cache=cache)
        assert result.returncode == 0, result.stderr
        # 2 candidate requests (n=2 each), then 4 ratings, each invalid, each resampled once.
        assert server.completed == 2 + 4 * 2
        rejects = rows(tmp_path / "out.rejects.jsonl")
        judged = [r for r in rejects if r["reason"].startswith("unparsable rating")]
        assert len(judged) == 4 and all("sample 1" in r["reason"] and r["raw"][0].startswith('{"echo"') for r in judged)
        assert sum(r["reason"].startswith("fewer than 2 scored responses") for r in rejects) == 2
        assert "4 unparsable rating" in result.stdout and rows(out) == []
        again = distill(*args, cache=cache)
        assert again.returncode == 0 and server.completed == 10, "a rerun sends nothing"
        same_judge = distill(*args, "--judge", spec, cache=cache)
        assert same_judge.returncode == 1 and "the same judge is named twice" in same_judge.stderr


def test_panel_through_the_llama_cpp_server(llama_server, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"prompt": "What is 2 + 3?", "responses": ["2 + 3 = 5.", "It is 6."]}) + "\n")
    out, cache = tmp_path / "panel.jsonl", tmp_path / "cache"
    llama = f"openai:smollm2@{llama_server}"
    # One aspect: grammar-constrained sampling costs llama.cpp several seconds a reply on a busy CPU.
    args = ["feedback", "--input", str(inputs), "--output", str(out), "--judge", llama, "--judge", "embedded",
            "--aspects", "helpfulness", "--judge-max-tokens", "64", "--judge-temperature", "0", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    work = tmp_path / "panel.work"
    ratings, failed = stage_rows(work, "rate-judge1-"), stage_rows(work, "rate-judge1-", rejects=True)
    assert len(ratings) + len(failed) == 2 and ratings, "the server's grammar-constrained JSON parses"
    assert all(set(j["value"]) == {"helpfulness"} and j["judge"].startswith("openai:smollm2") for j in ratings)
    assert len(stage_rows(work, "rate-judge2-")) + len(stage_rows(work, "rate-judge2-", rejects=True)) == 2
    (fate,) = rows(out) + [r for r in check_rejects(tmp_path / "panel.rejects.jsonl", JUDGE_FAILURES | {"margin below minimum", "fewer than 2 scored responses"})
                          if r["reason"].split(":")[0] in ("margin below minimum", "fewer than 2 scored responses")]
    if fate.get("kind") == "preference":
        scored = [r for r in fate["meta"]["responses"] if r["overall"] is not None]
        assert fate["score_chosen"] == max(r["overall"] for r in scored) and fate["provenance"]["teacher"].count(",") == 1

    out = tmp_path / "pw.jsonl"
    args = ["feedback", "--mode", "pairwise", "--input", str(inputs), "--output", str(out), "--judge", llama,
            "--judge-max-tokens", "64", "--judge-temperature", "0", "--quiet"]
    result = distill(*args, cache=cache)
    assert result.returncode == 0, result.stderr
    verdicts = stage_rows(tmp_path / "pw.work", "pairwise-judge1-")
    assert sorted(v["item"]["order"] for v in verdicts) == ["ab", "ba"], "both orders judged, as valid JSON"
    rejects = check_rejects(tmp_path / "pw.rejects.jsonl", {"inconsistent verdicts", "tie"})
    assert len(rows(out)) + len(rejects) == 1


def test_prompt_field_reads_seed_sets_that_name_their_prompts_otherwise(tmp_path):
    from synth.errors import InputError

    seeds = Path(__file__).resolve().parents[1] / "data/self_instruct/seed_tasks.jsonl"
    items = read_inputs(seeds, 3, "instruction")
    assert len(items) == 3 and items[0][1].prompt.startswith("Is there anything I can eat for a breakfast")
    assert items[0][0] == f"{seeds}:1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Say hi."}) + "\n" + json.dumps({"question": "no instruction"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'instruction': expected a string"):
        read_inputs(bad, None, "instruction")


def lp(token: str, logprob: float, top: dict[str, float]):
    from synth.teachers.base import TokenLogprob, TopLogprob

    return TokenLogprob(token=token, logprob=logprob, top=[TopLogprob(token=t, logprob=v) for t, v in top.items()])


def test_winner_probability_reads_the_winner_token_after_a_prefill_or_in_the_reply():
    import math

    from synth.generators.feedback.pairwise import winner_probability

    a, b = math.log(0.6), math.log(0.2)
    # The local backend wrote '{"winner": "' itself: the first token is the winner.
    prefilled = Completion(text='{"winner": "A", "reason": "x"}', finish_reason="stop",
                           logprobs=[lp("A", a, {"A": a, "B": b, "tie": math.log(0.1)}), lp('", "reason": "x"}', -0.1, {})])
    assert winner_probability(prefilled) == pytest.approx(0.75)
    # An API writes the whole reply: the winner is the token after '"winner": "'.
    tokens = [lp('{"', -0.1, {}), lp('winner', -0.1, {}), lp('": "', -0.1, {}), lp("B", b, {" B": b, "A": a}), lp('"}', -0.1, {})]
    api = Completion(text="".join(t.token for t in tokens), finish_reason="stop", logprobs=tokens)
    assert winner_probability(api) == pytest.approx(0.75)
    assert winner_probability(Completion(text='{"winner": "A"}', finish_reason="stop")) is None, "no logprobs, no P(A)"


def test_swap_shift_cancels_a_position_bias():
    from synth.generators.feedback.pairwise import resolve_shift

    assert resolve_shift(0.95, 0.80, 0.05) == "i", "P(A) falls when j is shown as A: i is preferred"
    assert resolve_shift(0.80, 0.95, 0.05) == "j"
    assert resolve_shift(0.93, 0.92, 0.05) == "tie"
    p = prompted(["r0", "r1"])
    biased = {(0, 1): {"J1": {"ab": {"winner": "A", "p_a": 0.97, "id": "x"}, "ba": {"winner": "A", "p_a": 0.85, "id": "y"}}}}
    pairs, rejects = pairwise_pairs(p, biased, ["J1"], PROV, min_shift=0.05)
    assert [(q.chosen, q.rejected) for q in pairs] == [("r0", "r1")] and not rejects
    plain, rejects = pairwise_pairs(p, biased, ["J1"], PROV)
    assert not plain and rejects[0].reason.startswith("inconsistent verdicts"), "without min_shift the verdicts decide"


def test_a_reply_broken_after_its_winner_counts_only_when_p_a_decides():
    from synth.generators.feedback.pairwise import PairwiseGenerator

    template = load_template("feedback/pairwise", "en")
    cut = '{"winner": "B", "reason": "Response B answers the ques'
    with_logprobs = PairwiseGenerator(SamplingParams(temperature=0.3, max_tokens=24, logprobs=5), "judge", template)
    verdict, why = with_logprobs.read(cut)
    assert why is None and verdict.winner == "B" and verdict.reason.startswith("(reply broken after the winner")
    plain = PairwiseGenerator(SamplingParams(temperature=0.3, max_tokens=24), "judge", template)
    assert plain.read(cut)[0] is None, "without logprobs a broken reply is still unparsable"
    assert with_logprobs.read("I prefer the second one.")[0] is None

"""Labeling: answer extraction and checking on recorded replies, voting, and `distill label` end to end.

The end-to-end runs use the embedded teacher, llama.cpp's real server, and the echo
server (deterministic replies, so the vote's reasons and a teacher failure can be planted).
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
from synth.filters.verify import (
    extract_answer,
    get_checker,
    majority,
    numeric_checker,
    reference_answer,
    register_checker,
)
from synth.generators.label import LabelGenerator, LabelInput, LabelOptions, LabelSample, decide, trim_after_answer
from synth.pipelines.label import LabelSettings
from synth.records import Provenance, SFTExample, SoftLabels
from synth.teachers.base import ChatResponse, Completion
from tests.fault_server import fault_server

GSM8K = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "train.jsonl"
KINDS = {"truncated", "no answer", "wrong answer", "minority answer", "low agreement", "teacher error"}

# Recorded replies of every shape, and the answer each states.
REPLIES = [
    ("Natalia sold 48/2 = 24 clips in May.\nIn all 48+24 = 72.\nAnswer: 72", "72"),
    ("She sold 24 in May, so 72 in all.\n#### 72", "72"),
    ("The wallet costs $1,234.00 in total.\nAnswer: $1,234.00", "$1,234.00"),
    ("So we get $\\boxed{5}$.", "5"),
    ("**Final Answer:** 18 dollars.", "18 dollars"),
    ("Therefore, the answer is 3.5.", "3.5"),
    ("一共有 2+3=5 个苹果。\n答案：5", "5"),
    ("I cannot solve this.", None),
    ("Step 1: Determine the clips sold in May: 48 / 2 = 24. Then we add", None),  # cut off before the answer line
]


@pytest.mark.parametrize("text, answer", REPLIES)
def test_answer_extraction_on_recorded_replies(text, answer):
    assert extract_answer(text) == answer


def test_last_number_fallback_only_when_asked_and_never_for_a_refusal():
    truncated = REPLIES[-1][0]
    assert extract_answer(truncated, number_fallback=True) == "24"
    assert extract_answer("I cannot solve this.", number_fallback=True) is None
    echoed = 'Give the final answer in the form "Answer: <answer>".'
    assert extract_answer(echoed) is None, "the template's placeholder is not an answer"


@pytest.mark.parametrize(
    "predicted, reference, same",
    [
        ("72", "72", True), ("72.0", "72", True), ("72.00", "72", True), ("$1,234.00", "1234", True),
        ("72 clips", "72", True), ("50%", "50", True), ("\\frac{1}{2}", "0.5", True), ("-3", "-3.0", True),
        ("71", "72", False), ("1,234", "124", False), ("Paris.", "paris", True), ("Paris", "London", False),
    ],
)
def test_numeric_checker_compares_numbers_as_numbers(predicted, reference, same):
    assert numeric_checker(predicted, reference) is same


def test_reference_answers_and_checker_registry():
    assert reference_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert reference_answer(" 1,000 ") == "1,000" and reference_answer(7) == "7" and reference_answer("") is None
    assert get_checker("exact")("72.0", "72") is False and get_checker("numeric")("72.0", "72") is True
    assert get_checker("operator:eq")("a", "a") is True  # any importable callable
    register_checker("always", lambda a, b: True)
    assert get_checker("always")("1", "2") is True
    with pytest.raises(ConfigError, match="unknown checker 'nope'"):
        get_checker("nope")
    assert majority(["1", "2", "2.0", "1", "3"], numeric_checker) == [0, 3], "a tie goes to the answer seen first"


def label(config: LabelOptions, question: str, texts: list[str], reference: str | None = "#### 72", lengths=()):
    """Run LabelGenerator.parse on recorded replies; sample i is cut off when i is in `lengths`."""
    gen = LabelGenerator(config, "openai:recorded")
    fields = {"question": question} if reference is None else {"question": question, "answer": reference}
    task = gen.make_task(LabelInput(**fields), "in.jsonl:1")
    completions = [Completion(text=t, finish_reason="length" if i in lengths else "stop") for i, t in enumerate(texts)]
    return gen.parse(task, task.request, ChatResponse(completions=completions), True)


def test_verified_keeps_matching_samples_and_rejects_the_rest_with_reasons():
    texts = [REPLIES[0][0], "So it is 70.\nAnswer: 70", "I cannot solve this.", "Answer: 72.00", REPLIES[-1][0]]
    out = label(LabelOptions(n=5), "How many clips?", texts, lengths={4})
    assert [r.meta["answer"] for r in out.records] == ["72", "72.00"]
    reasons = sorted(r.reason for r in out.rejects)
    assert reasons == [
        "sample 1 of openai:recorded: wrong answer (got 70, expected 72)",
        "sample 2 of openai:recorded: no answer",
        "sample 4 of openai:recorded: truncated",
    ]
    assert all(r.raw and r.input["question"] == "How many clips?" for r in out.rejects)
    first = out.records[0]
    assert isinstance(first, SFTExample) and first.meta["verified"] is True and first.meta["reference"] == "72"
    assert first.meta["votes"] == {"72": 2, "70": 1} and first.meta["agreement"] == 0.4
    trl = first.to_trl()
    assert trl["prompt"][0]["role"] == "user" and "How many clips?" in trl["prompt"][0]["content"]
    assert trl["completion"] == [{"role": "assistant", "content": texts[0]}]
    assert first.provenance.method == "label" and first.provenance.sample == 0
    again = label(LabelOptions(n=5), "How many clips?", texts, lengths={4})
    assert [r.id for r in again.records] == [r.id for r in out.records], "ids are stable"


def test_a_cut_sample_that_already_answered_is_kept_up_to_its_answer_line_with_its_soft_labels():
    rambling = "48 / 2 = 24, 48 + 24 = 72.\nAnswer: 72\n\nJustification: the steps above show that"
    out = label(LabelOptions(n=2, keep="all"), "How many clips?", [rambling, REPLIES[-1][0]], lengths={0, 1})
    assert [r.completion[0].content for r in out.records] == ["48 / 2 = 24, 48 + 24 = 72.\nAnswer: 72"]
    assert out.records[0].meta["finish_reason"] == "answer" and out.records[0].meta["answer"] == "72"
    assert [r.reason for r in out.rejects] == ["sample 1 of openai:recorded: truncated"], "no answer line: still truncated"
    off = label(LabelOptions(n=2, keep="all", trim_truncated=False), "How many clips?", [rambling, REPLIES[-1][0]], lengths={0, 1})
    assert not off.records and len(off.rejects) == 2

    every = label(LabelOptions(n=3, keep="everything"), "How many clips?", [rambling, REPLIES[-1][0], "I cannot solve this."], lengths={0, 1})
    assert not every.rejects and [r.meta["answer"] for r in every.records] == [None, None, "72"]
    assert [r.meta["finish_reason"] for r in every.records] == ["length", "stop", "answer"], "cut and unanswered kept as written"
    assert every.records[0].completion[0].content == REPLIES[-1][0]

    pieces = ["48", " + 24 = 72.", "\n", "Answer", ":", " 7", "2", "\n\n", "Just", "ification"]
    soft = SoftLabels(tokenizer="t", tokens=pieces, token_ids=list(range(10)), top_ids=[[i] for i in range(10)],
                      top_logprobs=[[-0.1]] * 10)  # fmt: skip
    sample = LabelSample(id="s", task="t", teacher="x", sample=0, prompt=[], text="".join(pieces), finish_reason="length",
                         soft_labels=soft, provenance=Provenance(method="label", teacher="x", task="t"))  # fmt: skip
    cut = trim_after_answer(sample)
    assert cut.text == "48 + 24 = 72.\nAnswer: 72" and cut.soft_labels.tokens == pieces[:7]
    assert cut.soft_labels.token_ids == list(range(7)) and len(cut.soft_labels.top_logprobs) == 7
    split = sample.model_copy(update={"soft_labels": soft.model_copy(update={"tokens": ["4", *pieces[1:]]})})
    assert trim_after_answer(split) is None, "token pieces that do not spell the text: not trimmed"


def test_majority_vote_keeps_the_majority_reasoning_and_breaks_ties_by_first_seen():
    texts = ["Answer: 8", "Answer: 8.0", "Answer: 9", "Answer: $8"]
    out = label(LabelOptions(n=4, keep="majority"), "q", texts, reference=None)
    assert [r.provenance.sample for r in out.records] == [0, 1, 3]
    assert all(r.meta["verified"] is None and r.meta["agreement"] == 0.75 for r in out.records)
    assert [r.reason for r in out.rejects] == ["sample 2 of openai:recorded: minority answer (got 9, majority 8)"]

    tie = label(LabelOptions(n=4, keep="majority"), "q", ["Answer: 5", "Answer: 7", "Answer: 7", "Answer: 5"], reference=None)
    assert [r.meta["answer"] for r in tie.records] == ["5", "5"], "a tie goes to the answer seen first"
    flipped = label(LabelOptions(n=4, keep="majority"), "q", ["Answer: 7", "Answer: 5", "Answer: 5", "Answer: 7"], reference=None)
    assert [r.meta["answer"] for r in flipped.records] == ["7", "7"]

    low = label(LabelOptions(n=4, keep="majority", min_agreement=0.6), "q", ["Answer: 1", "Answer: 1", "Answer: 2", "x"], reference=None)
    assert not low.records and sum("low agreement (2/4 < 0.6)" in r.reason for r in low.rejects) == 2

    wrong_majority = label(LabelOptions(n=3, keep="majority"), "q", ["Answer: 5", "Answer: 5", "Answer: 72"])
    assert not wrong_majority.records
    assert sorted(r.reason.split(": ", 1)[1].split(" (")[0] for r in wrong_majority.rejects) == ["minority answer", "wrong answer", "wrong answer"]


def test_inputs_without_a_reference_use_self_consistency_unless_it_is_off():
    texts = ["Answer: 3", "Answer: 4", "Answer: 3"]
    voted = label(LabelOptions(n=3), "q", texts, reference=None)
    assert [r.meta["answer"] for r in voted.records] == ["3", "3"] and len(voted.rejects) == 1
    unvoted = label(LabelOptions(n=3, self_consistency=False), "q", texts, reference=None)
    assert len(unvoted.records) == 3 and not unvoted.rejects
    everything = label(LabelOptions(n=3, keep="all"), "q", ["Answer: 1", "Answer: 72", "no idea"])
    assert [r.meta["verified"] for r in everything.records] == [False, True] and len(everything.rejects) == 1


def test_votes_across_teachers_are_counted_per_teacher():
    config = LabelOptions(n=2, keep="majority")
    samples = []
    for teacher, texts in (("a", ["Answer: 6", "Answer: 7"]), ("b", ["Answer: 7", "Answer: 7.0"])):
        gen = LabelGenerator(config, teacher)
        task = gen.make_task(LabelInput(question="q"), "in:1")
        samples += gen.samples(task, task.request, ChatResponse(completions=[Completion(text=t, finish_reason="stop") for t in texts]))
    out = decide(samples, config, numeric_checker)
    assert [(r.provenance.teacher, r.provenance.sample) for r in out.records] == [("a", 1), ("b", 0), ("b", 1)]
    assert out.records[0].meta["teacher_votes"] == {"a": {"6": 1, "7": 1}, "b": {"7": 2}}
    assert len({r.id for r in out.records}) == 3


def test_config_file_flags_and_demonstrations(tmp_path):
    cfg = tmp_path / "label.yaml"
    cfg.write_text("keep: majority\nn: 8\nchecker: exact\ninstruction: Be careful.\n")
    args = build_parser().parse_args(["label", "--input", "x", "--output", "y", "--config", str(cfg), "-n", "3", "--lang", "zh"])
    config = load_config(args, LabelSettings)
    assert (config.keep, config.n, config.checker, config.lang) == ("majority", 3, "exact", "zh")
    demos = tmp_path / "demos.jsonl"
    demos.write_text(GSM8K.read_text(encoding="utf-8").splitlines()[0] + "\n")
    gen = LabelGenerator(config.model_copy(update={"demonstrations": demos}), "t")
    (message,) = gen.messages(LabelInput(question="新问题？"), "in:1")
    assert "Be careful." in message.content and "答案：72" in message.content and "<<" not in message.content
    assert message.content.endswith("问题：新问题？")
    plain = LabelGenerator(config, "t")
    assert plain.task_id(LabelInput(question="q")) != gen.task_id(LabelInput(question="q")), "demonstrations change the task"


# --- `distill label` end to end -------------------------------------------------------------


def distill(*args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gsm8k(path: Path, count: int) -> Path:
    path.write_text("".join(line + "\n" for line in GSM8K.read_text(encoding="utf-8").splitlines()[:count]))
    return path


def check_outputs(out: Path, samples: int) -> tuple[list[dict], list[dict]]:
    """The records and rejects of a run: together one per sample, each well-formed."""
    records, rejects = rows(out), rows(out.with_name(out.stem + ".rejects.jsonl"))
    assert len(records) + len(rejects) == samples
    for r in records:
        assert r["kind"] == "sft" and r["prompt"][0]["role"] == "user" and r["completion"][0]["role"] == "assistant"
        assert {"answer", "reference", "verified", "votes", "agreement"} <= set(r["meta"])
    for r in rejects:
        kind = r["reason"].split(": ", 1)[-1].split(" (")[0] if not r.get("error") else "teacher error"
        assert kind in KINDS and r["input"]["question"], r["reason"]
    return records, rejects


def test_label_on_the_embedded_teacher_with_soft_labels_and_a_free_rerun(tmp_path):
    inputs = gsm8k(tmp_path / "in.jsonl", 3)
    out = tmp_path / "labeled.jsonl"
    args = ["label", "--input", str(inputs), "--output", str(out), "-n", "2", "--max-tokens", "48",
            "--temperature", "0.7", "--logprobs", "3", "--quiet"]
    first = distill(*args, cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert "3 requests sent" in first.stdout and f"labeled examples to {out}" in first.stdout
    records, rejects = check_outputs(out, 6)
    samples = rows(out.with_name("labeled.work") / "samples-0.jsonl")
    assert len(samples) == 6 and {s["sample"] for s in samples} == {0, 1}
    for s in samples + records:
        soft = s["soft_labels"]
        assert soft["tokenizer"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and all(len(top) == 3 for top in soft["top_ids"])
    assert any(r["reason"].endswith(": truncated") for r in rejects), "48 tokens cut GSM8K reasoning short"

    before = (out.read_text(), out.with_name("labeled.rejects.jsonl").read_text())
    again = distill(*args, cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    assert "0 requests sent, 6 samples from cache" in again.stdout
    assert (out.read_text(), out.with_name("labeled.rejects.jsonl").read_text()) == before, "same ids, same output"


# llama.cpp's server answers one request at a time: queued requests would time out on a busy machine and be retried.
ONE_AT_A_TIME = ["--concurrency", "1", "--timeout", "600"]


@pytest.fixture(scope="module")
def llama_cache(tmp_path_factory):
    """One response cache for the llama.cpp tests: the two-teacher run reuses the single-teacher run's samples."""
    return tmp_path_factory.mktemp("llama-cache")


def test_label_through_llama_cpp_server_and_more_samples_pay_only_the_difference(llama_server, llama_cache, tmp_path):
    inputs = gsm8k(tmp_path / "in.jsonl", 2)
    out, cache = tmp_path / "labeled.jsonl", llama_cache
    teacher = f"openai:smollm2@{llama_server}"
    base = ["label", "--teacher", teacher, "--input", str(inputs), "--output", str(out), "--max-tokens", "48", "--quiet", *ONE_AT_A_TIME]
    first = distill(*base, "-n", "2", cache=cache)
    assert first.returncode == 0, first.stderr
    check_outputs(out, 4)
    samples = rows(out.with_name("labeled.work") / "samples-0.jsonl")
    assert {s["teacher"] for s in samples} == {f"openai:smollm2@{llama_server}"} and len({s["text"] for s in samples}) >= 2
    more = distill(*base, "-n", "3", cache=cache)
    assert more.returncode == 0, more.stderr
    assert "2 requests sent, 4 samples from cache" in more.stdout, more.stdout
    check_outputs(out, 6)


def test_two_teachers_embedded_and_llama_cpp_vote_together(llama_server, llama_cache, tmp_path):
    inputs = gsm8k(tmp_path / "in.jsonl", 2)
    out = tmp_path / "labeled.jsonl"
    args = ["label", "--teacher", "embedded", "--teacher", f"openai:smollm2@{llama_server}", "--input", str(inputs),
            "--output", str(out), "-n", "2", "--max-tokens", "48", "--keep", "all", "--quiet", *ONE_AT_A_TIME]
    result = distill(*args, cache=llama_cache)
    assert result.returncode == 0, result.stderr
    assert "teacher embedded: 2 requests sent" in result.stdout and f"teacher openai:smollm2@{llama_server}: " in result.stdout
    check_outputs(out, 8)
    work = out.with_name("labeled.work")
    teachers = {s["teacher"] for name in ("samples-0.jsonl", "samples-1.jsonl") for s in rows(work / name)}
    assert teachers == {"transformers:embedded", f"openai:smollm2@{llama_server}"}


def test_echo_teachers_plant_every_outcome_and_a_teacher_failure_is_retried(tmp_path):
    inputs = tmp_path / "in.jsonl"
    lines = [
        {"question": "Q1\nAnswer: 72\nend", "answer": "#### 72"},
        {"question": "Q2\nAnswer: 5\nend", "answer": "Natalia sold 6.\n#### 6"},
        {"question": "Q3 !fault=400*1\nAnswer: 1\nend", "answer": "#### 1.00"},
        {"question": "Q4\nAnswer: 9\nend"},
        {"question": "Q4\nAnswer: 9\nend"},  # the same input twice is labeled once
    ]
    inputs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, cache = tmp_path / "labeled.jsonl", tmp_path / "cache"
    with fault_server() as server:
        args = ["label", "--teacher", f"openai:a@{server.base_url}", "--teacher", f"openai:b@{server.base_url}",
                "--input", str(inputs), "--output", str(out), "-n", "2", "--quiet"]
        first = distill(*args, cache=cache)
        assert first.returncode == 0, first.stderr
        assert server.received == 8 and "1 requests failed at a teacher" in first.stdout
        records, rejects = check_outputs(out, 15)
        assert [r["input"]["question"][:2] for r in rejects] == ["Q2"] * 4 + ["Q3"]
        a, b = f"openai:a@{server.base_url}", f"openai:b@{server.base_url}"
        assert rejects[0]["reason"] == f"sample 0 of {a}: wrong answer (got 5, expected 6)" and rejects[-1]["error"]
        asked = [r["prompt"][0]["content"].split("Problem: ")[1][:2] for r in records]
        assert asked == ["Q1"] * 4 + ["Q3"] * 2 + ["Q4"] * 4, "input order, then teacher, then sample"
        assert records[0]["meta"]["teacher_votes"] == {a: {"72": 2}, b: {"72": 2}}
        assert records[-1]["meta"]["verified"] is None and records[-1]["meta"]["agreement"] == 1.0
        assert "rejects: 5" in first.stdout and "wrong answer: 4" in first.stdout and "teacher error: 1" in first.stdout

        second = distill(*args, cache=cache)  # only the failed request is sent again
        assert second.returncode == 0 and server.received == 9
        records, rejects = check_outputs(out, 16)
        assert len(records) == 12 and len(rejects) == 4
        before = out.read_text()
        third = distill(*args, cache=cache)
        assert third.returncode == 0 and server.received == 9 and out.read_text() == before


def test_bad_inputs_and_settings_fail_before_any_request(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"question": "ok"}\n{"prompt": "no question here"}\n')
    out = tmp_path / "o.jsonl"
    with fault_server() as server:
        teacher = f"openai:a@{server.base_url}"
        bad = distill("label", "--teacher", teacher, "--input", str(inputs), "--output", str(out), cache=tmp_path / "c")
        assert bad.returncode == 1 and "in.jsonl:2: field 'question': missing or not text" in bad.stderr
        twice = distill("label", "--teacher", teacher, "--teacher", teacher, "--input", str(inputs), "--output", str(out), cache=tmp_path / "c")
        assert twice.returncode == 1 and "given twice" in twice.stderr
        checker = distill("label", "--teacher", teacher, "--checker", "nope", "--input", str(inputs), "--output", str(out), cache=tmp_path / "c")
        assert checker.returncode == 1 and "unknown checker 'nope'" in checker.stderr
        assert server.received == 0
    assert not out.exists()


def test_a_direct_run_refuses_the_input_as_its_output(tmp_path):
    from synth.pipelines.label import run

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match="the input is also the output"):
        run(LabelSettings(input=inp, output=inp, teacher=["openai:x@http://127.0.0.1:9"]))
    assert inp.read_text() == '{"question": "q"}\n' and not (tmp_path / "in.work").exists()

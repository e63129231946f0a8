"""Expansion: the parsers on recorded replies of every shape, the filters and elimination rules, and both
commands end to end on the embedded teacher (structure, reasons, and a rerun that sends nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synth.filters.dedup import Shingler
from synth.filters.refusal import refusal
from synth.generators.expand.answer import answer_problem, instruction_problem
from synth.generators.expand.evol import (
    OPERATIONS,
    copies_wording,
    no_gain,
    parse_evolved,
    parse_verdict,
    pick_operation,
)
from synth.generators.expand.self_instruct import InstructionList, ProposeGenerator, RoundRequest, parse_instruction_list
from synth.pipelines.evol import EvolSettings
from synth.pipelines.expand import PoolItem, load_pool, reason_kind
from synth.pipelines.self_instruct import SelfInstructSettings, round_requests
from synth.prompts import load_template
from synth.teachers.base import ChatResponse, Completion, SamplingParams

OUT = Path("out.jsonl")
GOOD_LIST = '{"instructions": [{"instruction": "Name three rivers in Africa.", "input": ""}, {"instruction": "Fix the grammar.", "input": "He go home."}]}'


# -- the instruction-list parser ----------------------------------------------------------------
@pytest.mark.parametrize(
    "reply,finish,expect",
    [
        (GOOD_LIST, "stop", ["Name three rivers in Africa.", "Fix the grammar."]),
        ("Sure! Here they are:\n```json\n" + GOOD_LIST + "\n```\nEnjoy.", "stop", ["Name three rivers in Africa.", "Fix the grammar."]),
        ('[{"instruction": "Write a haiku about rain."}, "Explain recursion."]', "stop", ["Write a haiku about rain.", "Explain recursion."]),
        ('{"tasks": [{"task": "Sort these numbers.", "input": [3, 1]}]}', "stop", ["Sort these numbers."]),
        ('{"instructions": [{"instruction": "把下面的句子翻译成英文。", "input": "我喜欢猫。"}]}', "stop", ["把下面的句子翻译成英文。"]),
    ],
)
def test_instruction_list_good_shapes(reply, finish, expect):
    items, why = parse_instruction_list(reply, finish)
    assert why is None and [i.instruction for i in items] == expect


@pytest.mark.parametrize(
    "reply,finish,kind",
    [
        ('{"instructions": [{"instruction": "Name three rivers", "input": ', "length", "truncated"),
        ('{"instructions": [{"instruction": "Name three rivers"', "stop", "unparsable"),
        ("1. Name three rivers.\n2. Explain recursion.", "stop", "unparsable"),
        ("I'm sorry, but I can't help with creating tasks.", "stop", "refusal"),
        ("抱歉，我无法完成这个请求。", "stop", "refusal"),
        ('{"instructions": []}', "stop", "empty"),
        ('{"instructions": [{"instruction": "   "}]}', "stop", "empty"),
        ("", "stop", "empty"),
        ('{"answer": 42}', "stop", "unparsable"),
    ],
)
def test_instruction_list_bad_shapes(reply, finish, kind):
    items, why = parse_instruction_list(reply, finish)
    assert items is None and why.startswith(kind + ":"), why


def test_propose_generator_resamples_once_then_rejects_with_the_raw_text():
    template = load_template("expand/self_instruct", "en")
    params = SamplingParams(max_tokens=64, json_schema=InstructionList.model_json_schema())
    gen = ProposeGenerator(params, "test", template)
    item = RoundRequest(round=1, request=0, count=1, demos=[{"instruction": "Tell a joke.", "input": ""}])
    task = gen.make_task(item, "here")
    assert "Tell a joke." in task.request.messages[0].content and '"instructions"' in task.request.messages[0].content
    bad = ChatResponse(completions=[Completion(text="no json here", finish_reason="stop")])
    assert gen.parse(task, task.request, bad, final=False).resample == 1
    final = gen.parse(task, task.request, bad, final=True)
    assert final.rejects[0].raw == ["no json here"] and "unparsable" in final.rejects[0].reason
    good = gen.parse(task, task.request, ChatResponse(completions=[Completion(text=GOOD_LIST, finish_reason="stop")]), final=False)
    assert [c.instruction for c in good.records] == ["Name three rivers in Africa."], "at most `count` per reply"
    assert good.records[0].id == gen.parse(task, task.request, ChatResponse(completions=[Completion(text=GOOD_LIST)]), False).records[0].id


# -- the evolution parser and the elimination rules -----------------------------------------------
@pytest.mark.parametrize(
    "reply,finish,expect",
    [
        ('{"instruction": "Write a haiku about rain that mentions a city."}', "stop", "Write a haiku about rain that mentions a city."),
        ('```json\n{"rewritten_prompt": "Explain recursion with two examples."}\n```', "stop", "Explain recursion with two examples."),
        ('Here: {"Rewritten Prompt": "List five rivers and their lengths."}', "stop", "List five rivers and their lengths."),
        ("Explain recursion using a real-world analogy and two code examples.", "stop", "Explain recursion using a real-world analogy and two code examples."),
    ],
)
def test_evolved_good_shapes(reply, finish, expect):
    assert parse_evolved(reply, finish) == (expect, None)


@pytest.mark.parametrize(
    "reply,finish,kind",
    [
        ('{"instruction": "Write a haiku about', "length", "truncated"),
        ("Write a haiku about rain that", "length", "truncated"),
        ('{"instruction": "Write a haiku"', "stop", "unparsable"),
        ('{"instruction": 5}', "stop", "unparsable"),
        ("I'm sorry, I cannot rewrite this prompt.", "stop", "refusal"),
        ('{"instruction": ""}', "stop", "empty"),
        ("   ", "stop", "empty"),
    ],
)
def test_evolved_bad_shapes(reply, finish, kind):
    prompt, why = parse_evolved(reply, finish)
    assert prompt is None and why.startswith(kind + ":"), why


def test_copied_wording_is_caught():
    for text in ("#Rewritten Prompt#: Write a haiku.", "Rewrite the given prompt so it is harder.", "#Created Prompt# List rivers.", "根据给定提示，写一首诗。"):
        assert copies_wording(text), text
    assert copies_wording("Write a haiku about rain that names a city.") is None
    assert copies_wording("Prompt the user for a number, then print it.") is None


def test_no_information_gain_heuristic():
    sh, original = Shingler(), "Write a haiku about rain."
    assert "equal to the original" in no_gain(original, "write a haiku about rain", "constraints", 3, sh, 0.6)
    assert "adds 1 new words" in no_gain(original, "Write a short haiku about rain.", "deepen", 3, sh, 0.6)
    assert no_gain(original, "Write a haiku about rain that mentions a specific city and a season.", "constraints", 3, sh, 0.6) is None
    assert "near copy" in no_gain(original, "Write a haiku about rain, please.", "breadth", 3, sh, 0.6)
    assert no_gain(original, "Compose a tanka describing fog over a harbour at dawn.", "breadth", 3, sh, 0.6) is None
    assert no_gain(original, "Write a short haiku about rain.", "deepen", 3, sh, 0.6, heuristic=False) is None


@pytest.mark.parametrize(
    "reply,expect",
    [("Equal", True), ("Not Equal", False), ("not equal.", False), ("They are the same.", True), ("The prompts are different", False),
     ("相同", True), ("不相同", False), ("Maybe?", None), ("", None)],
)
def test_judge_verdicts(reply, expect):
    assert parse_verdict(reply) is expect


@pytest.mark.parametrize(
    "answer,finish,kind",
    [
        ("I'm sorry, but as an AI I cannot do that.", "stop", "refusal"),
        ("作为一个人工智能，我无法回答这个问题。", "stop", "refusal"),
        ("Paris.", "stop", "too short"),
        ("... the, a!", "stop", "too short"),
        ("The capital of France is Paris, on the Seine", "length", "truncated"),
        ("", "stop", "empty"),
    ],
)
def test_answer_rules(answer, finish, kind):
    assert answer_problem(answer, finish, min_words=3, refusal_words=80).startswith(kind)


def test_a_long_answer_that_says_sorry_once_is_kept():
    long = "Sorry for the wait. " + "Here is a detailed explanation of the water cycle and its stages. " * 10
    assert not refusal(long, within_words=80) and answer_problem(long, "stop", 3, 80) is None


@pytest.mark.parametrize(
    "text,kind",
    [
        ("Hi.", "filtered: too short"),
        ("- List three fruits that are red.", "filtered: starts with punctuation"),
        ("Draw a picture of a cat sitting on a mat.", "filtered: not a text task"),
        ("Describe the image below in two sentences.", "filtered: not a text task"),
        ("请为这张图片写一段说明。", "filtered: not a text task"),
        ("word " * 200, "filtered: too long"),
    ],
)
def test_instruction_filters(text, kind):
    config = SelfInstructSettings(output=OUT)
    assert instruction_problem(text, config.min_words, config.max_words, config.blocked_words).startswith(kind)


def test_instruction_filter_passes_ordinary_tasks_and_does_not_match_inside_words():
    config = SelfInstructSettings(output=OUT)
    for text in ("List three fruits that are red.", "Summarise the paragraph about mapping software.", "写一首关于秋天的短诗。"):
        assert instruction_problem(text, config.min_words, config.max_words, config.blocked_words) is None, text


def test_reason_kinds():
    assert reason_kind("[round 2] sample 1: unparsable: no JSON found") == "unparsable"
    assert reason_kind("[round-1] duplicate: near seed_task_3 (shingle Jaccard 0.71)") == "duplicate"
    assert reason_kind("[answers] too short: 1 content words (minimum 3)") == "too short"


# -- the pool and the rounds ------------------------------------------------------------------------
def test_seed_pool_and_seeded_rounds(tmp_path):
    seeds = load_pool(None)
    assert len(seeds) == 175 and len({s.id for s in seeds}) == 175 and seeds[1].input.startswith("Night : Day")
    own = tmp_path / "pool.jsonl"
    own.write_text(json.dumps({"instruction": "Tell a joke."}) + "\n" + json.dumps({"instruction": "Sort it.", "input": "3 1 2"}) + "\n")
    mine = load_pool(own)
    assert mine[0].id.startswith("pool-") and mine[1].prompt_text() == "Sort it.\n\n3 1 2"
    config = SelfInstructSettings(output=OUT, demos=4, machine_demos=2, requests_per_round=3)
    new = [PoolItem(id=f"n{i}", instruction=f"new task {i}") for i in range(5)]
    first = round_requests(config, 2, seeds, new)
    assert first == round_requests(config, 2, seeds, new), "a round is the same every run"
    assert first != round_requests(config, 3, seeds, new)
    assert all(len(r.demos) == 4 and sum(d["instruction"].startswith("new task") for d in r.demos) == 2 for r in first)
    assert pick_operation(0, 1, "a", ["deepen", "breadth"]) == pick_operation(0, 1, "a", ["deepen", "breadth"])
    with pytest.raises(ValueError):
        EvolSettings(output=OUT, operations=["deepen", "fly"])


def test_every_template_exists_in_both_languages():
    names = ["self_instruct", "answer", "equal"] + [f"evol_{op}" for op in OPERATIONS]
    for name in names:
        for lang in ("en", "zh"):
            assert load_template(f"expand/{name}", lang).source.strip()


# -- end to end on the embedded teacher -----------------------------------------------------------
def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=1200)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_rerun(args: list[str], out: Path, cache: Path, first: subprocess.CompletedProcess) -> None:
    before = (out.read_text(), out.with_name(out.stem + ".rejects.jsonl").read_text())
    again = run_cli(*args, cache=cache)
    assert again.returncode == 0, again.stderr
    assert "teacher: 0 requests sent" in again.stdout, again.stdout
    assert (out.read_text(), out.with_name(out.stem + ".rejects.jsonl").read_text()) == before, "a rerun reproduces the output"


def check_outputs(out: Path, stdout: str, method: str) -> None:
    records = rows(out)
    rejects = rows(out.with_name(out.stem + ".rejects.jsonl"))
    assert records or rejects, "the run must produce something"
    for r in records:
        assert r["kind"] == "sft" and r["prompt"][0]["role"] == "user" and r["completion"][0]["role"] == "assistant"
        assert r["provenance"]["method"] == method and r["meta"]["instruction_id"]
    for r in rejects:
        assert r["reason"].startswith("[") and r["reason"].split("] ", 1)[1], r
    assert f"wrote {len(records)} records" in stdout and f"rejects: {len(rejects)}" in stdout and "dedup:" in stdout


def test_self_instruct_end_to_end_on_the_embedded_teacher(tmp_path):
    out, cache = tmp_path / "si.jsonl", tmp_path / "cache"
    args = ["expand", "self-instruct", "--output", str(out), "--target", "3", "--max-rounds", "2", "--requests-per-round", "1",
            "--per-request", "3", "--demos", "2", "--machine-demos", "1", "--max-tokens", "32", "--answer-max-tokens", "16", "--quiet"]  # fmt: skip
    first = run_cli(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    check_outputs(out, first.stdout, "self-instruct")
    assert (tmp_path / "si.work" / "round-1.jsonl").exists() and (tmp_path / "si.work" / "instructions.jsonl").exists()
    check_rerun(args, out, cache, first)


def test_evol_end_to_end_on_the_embedded_teacher(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in ("Name a fruit that is red.", "Explain what rain is.")))
    out, cache = tmp_path / "evol.jsonl", tmp_path / "cache"
    args = ["expand", "evol", "--input", str(pool), "--output", str(out), "--rounds", "1", "--max-tokens", "40",
            "--answer-max-tokens", "16", "--min-answer-words", "2", "--min-new-words", "1", "--lang", "en", "--quiet"]  # fmt: skip
    first = run_cli(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    check_outputs(out, first.stdout, "evol-instruct")
    for r in rows(out):
        assert r["meta"]["operation"] in OPERATIONS and r["meta"]["original"] in ("Name a fruit that is red.", "Explain what rain is.")
    check_rerun(args, out, cache, first)


# -- every stage through a real HTTP teacher that echoes (tests/fault_server.py) ------------------
# The echo server answers "echo: <the user message> #<seed>". These templates make that echo a
# well-formed reply, so the filters, dedup, pool growth, elimination and answers all run for real.
PROPOSE = (
    '{"instructions": [{% for d in demos %}{"instruction": {{ ("Explain to a beginner: " ~ d.instruction) | tojson }}}'
    "{% if not loop.last %}, {% endif %}{% endfor %}]}"
)


def echo_teacher(server) -> str:
    return f"openai:echo@{server.base_url}"


def test_self_instruct_pool_growth_filters_dedup_and_answers_over_http(tmp_path):
    from synth.pipelines import self_instruct
    from synth.job import RunSettings
    from tests.fault_server import fault_server

    seeds = tmp_path / "seeds.jsonl"
    texts = ["Name a red fruit.", "Give a synonym of happy.", "List two rivers.", "Describe an image of a cat.",
             "Summarize the following news article about the local football club in three short sentences for a newsletter."]  # fmt: skip
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "instruction": t}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "propose.jinja").write_text(PROPOSE)
    out, settings = tmp_path / "si.jsonl", RunSettings(cache_dir=tmp_path / "cache", progress=False)
    with fault_server(json_schema=False, json_object=False) as server:
        config = SelfInstructSettings(seeds=seeds, target=3, max_rounds=3, requests_per_round=2, demos=5, machine_demos=1, per_request=5,
                                      template=str(tmp_path / "propose.jinja"), output=out, teacher=echo_teacher(server), run=settings)  # fmt: skip
        result = self_instruct.run(config)
        sent = server.completed
        assert result.instructions == 3 and result.records == 3 and sent == result.requests_sent > 0
        records, rejects = rows(out), rows(tmp_path / "si.rejects.jsonl")
        kinds = {reason_kind(r["reason"]) for r in rejects}
        assert kinds == {"duplicate", "filtered", "surplus"}, kinds
        assert result.rounds == 1, "the first round's five demonstrations yield the three new tasks"
        assert any("not a text task (mentions 'image')" in r["reason"] for r in rejects)
        assert any("duplicate: near s4" in r["reason"] for r in rejects), "the long seed's paraphrase is a near duplicate"
        assert all(r["completion"][0]["content"].startswith("echo: Explain to a beginner:") for r in records)
        assert result.dedup.kept == 3 and result.dedup.near + result.dedup.exact >= 1
        pool = rows(tmp_path / "si.work" / "instructions.jsonl")
        assert [p["instruction"] for p in pool] == [r["prompt"][0]["content"] for r in sorted(records, key=lambda r: [p["id"] for p in pool].index(r["meta"]["instruction_id"]))]

        again = self_instruct.run(config)
        assert server.completed == sent and again.requests_sent == 0, "a rerun sends nothing"
        assert rows(out) == records and rows(tmp_path / "si.rejects.jsonl") == rejects


def test_evol_elimination_and_survivors_over_http(tmp_path):
    from synth.pipelines import evol
    from synth.job import RunSettings
    from tests.fault_server import fault_server

    pool = tmp_path / "pool.jsonl"
    texts = ["Name a red fruit.", "Give a synonym of happy.", "List two rivers.", "Explain what rain is.", "Write a haiku about snow."]
    pool.write_text("".join(json.dumps({"id": f"p{i}", "instruction": t}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "deepen.jinja").write_text("Rewrite with more depth: {{ prompt }} Justify every claim with evidence.")
    (tmp_path / "breadth.jinja").write_text("#Created Prompt#: {{ prompt }}")
    operations = ["deepen", "breadth"]
    ops = [pick_operation(0, 1, f"p{i}", operations) for i in range(len(texts))]
    assert "deepen" in ops and "breadth" in ops, "the seeded draw covers both operations"
    out, settings = tmp_path / "evol.jsonl", RunSettings(cache_dir=tmp_path / "cache", progress=False)
    with fault_server(json_schema=False, json_object=False) as server:
        config = EvolSettings(input=pool, rounds=2, operations=operations, min_answer_words=2, output=out, teacher=echo_teacher(server), run=settings,
                              templates={"deepen": str(tmp_path / "deepen.jinja"), "breadth": str(tmp_path / "breadth.jinja")})  # fmt: skip
        evol.run(config)
        records, rejects = rows(out), rows(tmp_path / "evol.rejects.jsonl")
        first = [r for r in records if r["meta"]["round"] == 1]
        assert sorted(r["meta"]["parent"] for r in first) == [f"p{i}" for i, op in enumerate(ops) if op == "deepen"]
        assert all(r["meta"]["operation"] == "deepen" and "Justify every claim" in r["prompt"][0]["content"] for r in records)
        copied = [r for r in rejects if "copies the prompt's wording" in r["reason"]]
        assert len([r for r in copied if r["reason"].startswith("[round-1]")]) == ops.count("breadth")
        second = [r for r in records if r["meta"]["round"] == 2]
        assert all(r["meta"]["parent"] in {f["meta"]["instruction_id"] for f in first} | {f"p{i}" for i in range(5)} for r in second)
        sent = server.completed

        again = evol.run(config)
        assert server.completed == sent and again.requests_sent == 0
        assert rows(out) == records and rows(tmp_path / "evol.rejects.jsonl") == rejects


def test_evol_teacher_judged_information_gain_over_http(tmp_path):
    from synth.pipelines import evol
    from synth.job import RunSettings
    from tests.fault_server import fault_server

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "p0", "instruction": "Name a red fruit."}) + "\n")
    (tmp_path / "deepen.jinja").write_text("Rewrite with more depth: {{ prompt }} Justify every claim with evidence.")
    # The echo repeats the question, whose own words include "Not Equal": the verdict parser reads that as a gain.
    out = tmp_path / "evol.jsonl"
    with fault_server(json_schema=False, json_object=False) as server:
        result = evol.run(EvolSettings(input=pool, operations=["deepen"], info_gain="teacher", judge_max_tokens=300, min_answer_words=2,
                                       templates={"deepen": str(tmp_path / "deepen.jinja")}, output=out, teacher=echo_teacher(server),
                                       run=RunSettings(cache_dir=tmp_path / "cache", progress=False)))  # fmt: skip
    assert list(result.stages) == ["round-1-evolve", "round-1-judge", "round-1-answer"]
    assert result.stages["round-1-judge"].records == 1 and result.records == 1
    verdict = rows(tmp_path / "evol.work" / "round-1-judge.jsonl")[0]
    assert verdict["equal"] is False and "Name a red fruit." in verdict["text"]


def test_yaml_config_with_nested_dedup_and_flags_on_top(tmp_path):
    from distill.cli import build_parser
    from distill.commands.common import pipeline_settings
    from synth.errors import ConfigError

    def settings(*flags: str) -> SelfInstructSettings:
        args = build_parser().parse_args(["expand", "self-instruct", "--output", str(tmp_path / "si.jsonl"), *flags])
        return pipeline_settings(vars(args), SelfInstructSettings)

    path = tmp_path / "si.yaml"
    path.write_text("target: 7\nmax_rounds: 4\ndedup:\n  threshold: 0.8\n  shingle_size: 3\n")
    config = settings("--config", str(path), "--target", "9", "--lang", "zh")
    assert (config.target, config.max_rounds, config.lang, config.dedup.threshold, config.dedup.shingle_size) == (9, 4, "zh", 0.8, 3)
    path.write_text("dedup:\n  treshold: 0.8\n")
    with pytest.raises(ConfigError, match="treshold"):
        settings("--config", str(path))
    path.write_text("output: other.jsonl\n")
    with pytest.raises(ConfigError, match="key 'output': unknown key"):
        settings("--config", str(path))

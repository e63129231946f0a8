"""`distill curate`: taxonomy loading, cells, the reply parsers, and whole runs on real teachers.

Parsers are tested on recorded replies of every shape. Whole runs go through the
echo server over HTTP (deterministic: it replies with the prompt, so the JSON put in
--instruction is what "the teacher" proposes, and every cell proposes the same
questions: dedup and empty cells are exercised exactly) and through the embedded
model (real generation: the tiny model mostly writes junk JSON, so those tests
assert structure, and that junk becomes rejects).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synth.errors import ConfigError
from synth.generators.base import Task
from synth.generators.curate.stages import (
    CellInput,
    QuestionAnswerGenerator,
    QuestionGenerator,
    QuestionInput,
    QuestionRecord,
    parse_questions,
    parse_subtopics,
)
from synth.generators.curate.taxonomy import all_cells, load_taxonomy, sample_cells
from synth.pipelines.curate import CurateSettings, dedup_questions
from synth.prompts import load_template
from synth.records import Provenance
from synth.teachers.base import (
    ChatResponse,
    Completion,
    SamplingParams,
)
from tests.fault_server import fault_server

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "topics": [
        {"name": "Algebra", "subtopics": [
            {"name": "Linear equations", "knowledge_points": ["two-step equations", "systems"]},
            {"name": "Quadratics"},
        ]},
        {"name": "Probability"},
    ],
    "task_types": ["word problem", {"name": "computation", "description": "no story"}],
    "difficulty_levels": ["easy", "hard"],
}  # fmt: skip


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", "curate", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- taxonomy --------------------------------------------------------------------------------


def test_shipped_taxonomies_load_by_path_and_by_name():
    math = load_taxonomy(ROOT / "data/taxonomies/math_en.yaml")
    assert [t.name for t in math.topics][:2] == ["Arithmetic", "Algebra"]
    assert math.task_types[0].name == "word problem" and math.task_types[0].description
    zh = load_taxonomy("zh_general")
    assert zh.difficulty_levels[0].name == "简单"
    cells = all_cells(zh)
    assert any(c.knowledge_point == "丝绸之路" for c in cells)
    assert len({c.id for c in cells}) == len(cells)


def test_unknown_key_is_named_with_the_file(tmp_path):
    data = json.loads(json.dumps(SMALL))
    data["topics"][0]["subtopics"][1]["subtopic"] = [{"name": "typo"}]
    path = write_yaml(tmp_path / "tax.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_taxonomy(path)
    assert str(path) in str(err.value)
    assert "key 'topics.0.subtopics.1.subtopic': unknown key" in str(err.value)


def test_wrong_types_and_bad_structure_are_named(tmp_path):
    cases = [
        ({**SMALL, "difficulty_levels": "easy"}, "difficulty_levels"),
        ({**SMALL, "task_types": []}, "task_types"),
        ({**SMALL, "topics": [{"name": "A", "knowledge_points": 3}]}, "topics.0.knowledge_points"),
        ({**SMALL, "topics": [{"name": "A", "knowledge_points": ["k"], "subtopics": [{"name": "B"}]}]}, "belong on its leaf subtopics"),
        ({**SMALL, "topics": [{"name": "A"}, {"name": "a "}]}, "both named"),
    ]
    for i, (data, expected) in enumerate(cases):
        path = write_yaml(tmp_path / f"bad{i}.yaml", data)
        with pytest.raises(ConfigError, match=str(path)) as err:
            load_taxonomy(path)
        assert expected in str(err.value), str(err.value)
    (tmp_path / "broken.yaml").write_text("topics: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_taxonomy(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="shipped taxonomies: .*math_en"):
        load_taxonomy(tmp_path / "missing.yaml")


def test_cells_are_the_cross_product_in_file_order(tmp_path):
    tax = load_taxonomy(write_yaml(tmp_path / "t.yaml", SMALL))
    cells = all_cells(tax)
    # leaves: Linear equations (2 knowledge points), Quadratics, Probability → 4 × 2 task types × 2 levels
    assert len(cells) == 16
    assert cells[0].label == "Algebra > Linear equations | word problem | easy | two-step equations"
    assert cells[-1].label == "Probability | computation | hard"
    assert len(all_cells(tax, knowledge_points=False)) == 12
    assert [c.id for c in all_cells(tax)] == [c.id for c in cells], "ids are stable"


def test_seeded_sample_is_deterministic_and_keeps_order(tmp_path):
    cells = all_cells(load_taxonomy(write_yaml(tmp_path / "t.yaml", SMALL)))
    a, b = sample_cells(cells, 5, seed=3), sample_cells(cells, 5, seed=3)
    assert [c.id for c in a] == [c.id for c in b] and len(a) == 5
    positions = [cells.index(c) for c in a]
    assert positions == sorted(positions)
    assert any([c.id for c in sample_cells(cells, 5, seed=s)] != [c.id for c in a] for s in range(4, 8))
    assert sample_cells(cells, 100, seed=0) == cells and sample_cells(cells, None, seed=0) == cells


OUT = Path("out.jsonl")


def test_config_wants_exactly_one_source():
    with pytest.raises(ValueError, match="either taxonomy"):
        CurateSettings(output=OUT)
    with pytest.raises(ValueError, match="either taxonomy"):
        CurateSettings(output=OUT, taxonomy="math_en", root_topic="x")
    with pytest.raises(ValueError, match="for root_topic"):
        CurateSettings(output=OUT, taxonomy="math_en", task_types=["a"])
    assert CurateSettings(output=OUT, root_topic=" Python ").root_topic == "Python"


# -- parsers on recorded replies ------------------------------------------------------------------

GOOD = '{"questions": ["What is 3/4 + 1/8?", "Simplify 6/8."]}'
FENCED = 'Here are your questions:\n\n```json\n{"questions": ["1. What is 20% of 50?", "2) Is 0.5 equal to 1/2?"]}\n```\nHope this helps!'
BARE_LIST = '[{"question": "Solve 2x + 3 = 7."}, "Solve x - 1 = 4."]'
MALFORMED = '{"questions": ["What is 2+2?", }'
REFUSAL = "I'm sorry, but I can't help with writing questions on that topic."
REFUSAL_ZH = "抱歉，我无法完成这个请求。"
TRUNCATED = '{"questions": ["A train leaves the station at 3 pm travelling at 60 km/h. A second train'
# What SmolLM2-135M actually wrote when shown the schema: the schema itself.
SCHEMA_ECHO = '{"description": "A reply", "properties": {"questions": {"type": "array"}}, "required": ["questions"]}'


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        (GOOD, "stop", ["What is 3/4 + 1/8?", "Simplify 6/8."]),
        (FENCED, "stop", ["What is 20% of 50?", "Is 0.5 equal to 1/2?"]),
        (BARE_LIST, "stop", ["Solve 2x + 3 = 7.", "Solve x - 1 = 4."]),
        ('{"questions": ["你好吗？"]}', "length", ["你好吗？"]),
    ],
)
def test_question_parser_accepts_good_replies(text, finish, expected):
    assert parse_questions(text, finish) == (expected, None)


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        (MALFORMED, "stop", "unparsable: no JSON found"),
        (REFUSAL, "stop", "refusal"),
        (REFUSAL_ZH, "stop", "refusal"),
        (TRUNCATED, "length", "truncated: hit max_tokens"),
        (SCHEMA_ECHO, "stop", "unparsable: JSON does not fit QuestionList: field 'questions'"),
        ('{"questions": ["<question 1>", "<question 2>"]}', "stop", "empty"),
        ('{"questions": []}', "stop", "empty"),
        ('{"questions": ["  ", 3]}', "stop", "empty"),
        ("", "stop", "empty"),
    ],
)
def test_question_parser_rejects_bad_replies_with_a_reason(text, finish, reason):
    questions, why = parse_questions(text, finish)
    assert questions is None and why.startswith(reason), why


def test_subtopic_parser_dedups_siblings_and_drops_the_topics_own_path():
    text = '{"subtopics": ["Data types", "data types.", "Python", "Web frameworks", "' + "x" * 200 + '", "Testing"]}'
    assert parse_subtopics(text, "stop", ["Python"]) == (["Data types", "Web frameworks", "Testing"], None)
    names, why = parse_subtopics('{"subtopics": ["Python", "PYTHON!"]}', "stop", ["Python"])
    assert names is None and why.startswith("empty")
    assert parse_subtopics("Sure! Python has many areas.", "stop", ["Python"])[1].startswith("unparsable")
    # Recorded from SmolLM2-135M: objects instead of strings, fenced, chatter after it.
    recorded = 'Here\'s a JSON representation:\n\n```json\n{"subtopics": [{"name": "Data structures", "description": "lists"}, {"name": "Decorators"}]}\n```\nThe first'
    assert parse_subtopics(recorded, "length", ["Python"]) == (["Data structures", "Decorators"], None)
    assert parse_subtopics('{"subtopics": ["<subtopic 1>", "…"]}', "stop", ["Python"])[1].startswith("empty")


def _task(item, gen) -> Task:
    return gen.make_task(item, "test")


def _response(*texts: str, finish: str = "stop") -> ChatResponse:
    return ChatResponse(completions=[Completion(text=t, finish_reason=finish) for t in texts])


def test_question_generator_resamples_once_then_rejects_with_the_raw_text():
    gen = QuestionGenerator(SamplingParams(max_tokens=64), "test:t", load_template("curate/questions"))
    cell = CellInput(cell="c1", topic=["Algebra"], task_type="computation", difficulty="easy", count=1)
    task = _task(cell, gen)
    assert "Topic: Algebra" in task.request.messages[0].content
    first = gen.parse(task, task.request, _response(REFUSAL), final=False)
    assert first.resample == 1 and not first.records and not first.rejects
    final = gen.parse(task, task.request, _response(REFUSAL), final=True)
    assert final.rejects[0].raw == [REFUSAL] and "refusal" in final.rejects[0].reason
    good = gen.parse(task, task.request, _response(GOOD), final=False)
    assert [r.question for r in good.records] == ["What is 3/4 + 1/8?"], "count=1 keeps the first"
    assert good.records[0].meta["topic"] == ["Algebra"]
    zh = QuestionGenerator(SamplingParams(max_tokens=64), "test:t", load_template("curate/questions", "zh"))
    text = _task(cell.model_copy(update={"knowledge_point": "丝绸之路"}), zh).request.messages[0].content
    assert "主题：Algebra" in text and "知识点：丝绸之路" in text and "编写 1 道新题目" in text


def test_answer_generator_writes_trl_prompt_completion_and_rejects_truncated_or_empty():
    gen = QuestionAnswerGenerator(SamplingParams(max_tokens=64), "test:t", load_template("curate/answer", "zh"))
    item = QuestionInput(question="1+1 等于几？", meta={"cell": "c", "topic": ["算术"], "task_type": "计算题", "difficulty": "简单", "knowledge_point": None})
    task = _task(item, gen)
    assert "请回答下面的问题" in task.request.messages[0].content
    out = gen.parse(task, task.request, _response("等于 2。"), final=True)
    (rec,) = out.records
    assert rec.to_trl() == {"prompt": [{"role": "user", "content": "1+1 等于几？"}], "completion": [{"role": "assistant", "content": "等于 2。"}]}
    assert rec.meta["difficulty"] == "简单" and rec.provenance.method == "curate"
    assert gen.outcome(task, task.request, _response("  "), final=False).resample == 1
    assert gen.outcome(task, task.request, _response("  "), final=True).rejects[0].reason.endswith("empty answer")
    cut = gen.parse(task, task.request, _response("首先", finish="length"), final=False)
    assert not cut.records and "truncated answer" in cut.rejects[0].reason
    teacher_form = QuestionAnswerGenerator(SamplingParams(max_tokens=64), "test:t", load_template("curate/answer", "zh"), prompt_form="teacher")
    assert teacher_form.task_id(item) != task.id, "a different record shape is a different task"


def test_dedup_keeps_the_first_copy_and_rejects_the_rest():
    prov = Provenance(teacher="t", method="curate-questions", task="task1")
    qs = [
        QuestionRecord(id=f"q{i}", question=q, index=i, meta={"cell": cell, "topic": ["A", cell]}, provenance=prov)
        for i, (q, cell) in enumerate([("What is 2+2?", "x"), ("what is  2+2?", "y"), ("What is 3+3?", "x"), ("What is 2+2?", "x")])
    ]
    kept, rejects = dedup_questions(qs)
    assert [q.id for q in kept] == ["q0", "q2"]
    assert [r.reason for r in rejects] == ["duplicate question: same as question q0 (A > x)", "duplicate question: same as question q0 (the same cell)"]


# -- whole runs -----------------------------------------------------------------------------------


def test_echo_teacher_run_writes_records_coverage_rejects_and_a_rerun_sends_nothing(tmp_path):
    """Every cell proposes the same two questions: the first cell keeps them, the others are duplicates."""
    tax = write_yaml(tmp_path / "t.yaml", SMALL)
    out, cache = tmp_path / "out" / "curated.jsonl", tmp_path / "cache"
    with fault_server(json_schema=False, json_object=False) as server:
        args = ["--taxonomy", str(tax), "--output", str(out), "--per-cell", "2", "--max-cells", "3", "--seed", "1",
                "--teacher", f"openai:echo@{server.base_url}", "--quiet",
                "--instruction", 'Example: {"questions": ["What is 2 + 2?", "1. Name a prime number."]}']  # fmt: skip
        first = run_cli(*args, cache=cache)
        assert first.returncode == 0, first.stderr
        sent = server.completed
        # 3 question requests (JSON mode probing may add refused tries) + 2 answers
        assert sent == 5
        records = rows(out)
        assert len(records) == 2
        for rec in records:
            assert rec["kind"] == "sft" and rec["prompt"][0]["role"] == "user" and rec["completion"][0]["role"] == "assistant"
            assert rec["prompt"][0]["content"] in ("What is 2 + 2?", "Name a prime number.")
            assert set(rec["meta"]) >= {"cell", "topic", "task_type", "difficulty", "knowledge_point"}
        rejects = rows(out.with_name("curated.rejects.jsonl"))
        assert len(rejects) == 4 and all(r["reason"].startswith("dedup: duplicate question") for r in rejects)
        coverage = json.loads(out.with_name("curated.coverage.json").read_text())
        assert coverage["totals"] == {
            "cells_in_taxonomy": 16, "cells": 3, "cells_with_records": 1, "cells_without_records": 2,
            "questions_per_cell_asked": 2, "questions": 2, "records": 2, "rejects": 4,
        }  # fmt: skip
        assert [c["records"] for c in coverage["cells"]] == [2, 0, 0]
        md = out.with_name("curated.coverage.md").read_text()
        assert "**2 cells without records**" in md and md.count("\n| ") == 2 + 3
        assert "wrote 2 records" in first.stdout and "curated.coverage.md" in first.stdout

        before = {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()}
        again = run_cli(*args, cache=cache)
        assert again.returncode == 0, again.stderr
        assert server.completed == sent, "a rerun must not send a single request"
        assert "0 requests sent" in again.stdout
        assert {p.name: p.read_bytes() for p in out.parent.iterdir() if p.is_file()} == before

        truncated = run_cli(*args, "--answer-max-tokens", "3", "--output", str(tmp_path / "cut.jsonl"), cache=cache)
        assert truncated.returncode == 0, truncated.stderr
        reasons = [r["reason"] for r in rows(tmp_path / "cut.rejects.jsonl")]
        assert sum("answers: sample 0: truncated answer" in r for r in reasons) == 2


def test_echo_teacher_grows_a_tree_written_as_a_reusable_taxonomy(tmp_path):
    out, cache = tmp_path / "grown.jsonl", tmp_path / "cache"
    config = write_yaml(tmp_path / "curate.yaml", {"root_topic": "Python programming", "depth": 2, "breadth": 2, "per_cell": 3})
    with fault_server(json_schema=False, json_object=False) as server:
        res = run_cli("--config", str(config), "--per-cell", "1", "--max-cells", "2",
                      "--task-types", "quiz", "--difficulties", "easy", "--output", str(out),
                      "--teacher", f"openai:echo@{server.base_url}", "--quiet",
                      "--instruction", '{"subtopics": ["Basics", "Libraries"], "questions": ["What is a list?"]}', cache=cache)  # fmt: skip
        assert res.returncode == 0, res.stderr
    tree = out.with_name("grown.tree.yaml")
    assert f"topic tree: {tree}" in res.stdout
    grown = load_taxonomy(tree)
    (root,) = grown.topics
    assert root.name == "Python programming"
    assert [t.name for t in root.subtopics] == ["Basics", "Libraries"]
    # A child never repeats a name on its own path: each got only the other name.
    assert [t.name for t in root.subtopics[0].subtopics] == ["Libraries"]
    assert [t.name for t in root.subtopics[1].subtopics] == ["Basics"]
    assert [t.name for t in grown.task_types] == ["quiz"]
    assert len(all_cells(grown)) == 2
    assert server.completed == 3 + 2 + 1, "3 tree requests, 2 cells, 1 answer (the second cell's question is a duplicate)"


def test_echo_teacher_chinese_taxonomy_with_soft_labels(tmp_path):
    out = tmp_path / "zh.jsonl"
    with fault_server(json_schema=False, json_object=False) as server:
        res = run_cli("--taxonomy", "zh_general", "--lang", "zh", "--per-cell", "1", "--max-cells", "2", "--logprobs", "2",
                      "--instruction", '{"questions": ["丝绸之路从哪里开始？"]}', "--output", str(out),
                      "--teacher", f"openai:echo@{server.base_url}", "--quiet", cache=tmp_path / "cache")  # fmt: skip
        assert res.returncode == 0, res.stderr
        asked = [m["content"] for b in server.bodies for m in b["messages"] if m["role"] == "user"]
    # Two cells (the server also saw the refused JSON-mode probes, with the same text).
    assert len({a for a in asked if "主题：" in a and "难度：" in a}) == 2
    (rec,) = rows(out)
    assert rec["prompt"] == [{"role": "user", "content": "丝绸之路从哪里开始？"}]
    assert rec["meta"]["difficulty"] in ("简单", "中等", "困难")
    assert len(rec["soft_labels"]["top_logprobs"][0]) == 2
    assert json.loads(out.with_name("zh.coverage.json").read_text())["totals"]["cells_without_records"] == 1


def test_embedded_teacher_end_to_end_and_rerun_is_free(tmp_path):
    tax = write_yaml(tmp_path / "t.yaml", SMALL)
    out, cache = tmp_path / "emb.jsonl", tmp_path / "cache"
    args = ["--taxonomy", str(tax), "--output", str(out), "--per-cell", "1", "--max-cells", "2", "--question-max-tokens", "16",
            "--answer-max-tokens", "8", "--question-temperature", "0", "--answer-temperature", "0", "--quiet"]  # fmt: skip
    first = run_cli(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    records, rejects = rows(out), rows(out.with_name("emb.rejects.jsonl"))
    coverage = json.loads(out.with_name("emb.coverage.json").read_text())
    totals = coverage["totals"]
    assert totals["cells"] == 2 and len(coverage["cells"]) == 2
    assert totals["records"] == len(records) and totals["rejects"] == len(rejects)
    # Every cell ends as records or rejects: one question each, answered or not.
    assert len(records) + len(rejects) >= 2
    for rec in records:
        assert rec["completion"][0]["role"] == "assistant" and rec["meta"]["cell"] in {c["cell"] for c in coverage["cells"]}
    for rej in rejects:
        assert rej["reason"].split(":")[0] in ("questions", "dedup", "answers") and rej["raw"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("emb.")}
    again = run_cli(*args, cache=cache)
    assert again.returncode == 0, again.stderr
    assert "teacher: 0 requests sent" in again.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("emb.")} == before


def test_embedded_teacher_grows_a_tree_and_junk_replies_become_rejects(tmp_path):
    out, cache = tmp_path / "tree.jsonl", tmp_path / "cache"
    res = run_cli("--root-topic", "Python programming", "--depth", "1", "--breadth", "2", "--per-cell", "1", "--max-cells", "1",
                  "--tree-max-tokens", "16", "--question-max-tokens", "16", "--answer-max-tokens", "8", "--lang", "zh",
                  "--tree-temperature", "0", "--question-temperature", "0", "--answer-temperature", "0",
                  "--output", str(out), "--quiet", cache=cache)  # fmt: skip
    assert res.returncode == 0, res.stderr
    grown = load_taxonomy(out.with_name("tree.tree.yaml"))
    (root,) = grown.topics
    assert root.name == "Python programming" and len(root.subtopics) <= 2
    assert [d.name for d in grown.difficulty_levels] == ["简单", "中等", "困难"]
    rejects = rows(out.with_name("tree.rejects.jsonl"))
    if not root.subtopics:
        # The tiny model's reply did not parse: the root stays a leaf and the reply is kept as a reject.
        assert any(r["reason"].startswith("tree-1: sample 0:") and r["raw"] for r in rejects)
    coverage = json.loads(out.with_name("tree.coverage.json").read_text())
    assert coverage["totals"]["cells"] == 1
    assert coverage["totals"]["records"] + coverage["totals"]["rejects"] >= 1

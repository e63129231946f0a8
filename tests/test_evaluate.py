"""Evaluation: tiny Llama students against the embedded teacher, its cache, the judge, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from synth.errors import ConfigError, InputError
from synth.generators.label import LabelGenerator, LabelInput, LabelOptions
from tests.tiny_models import make_tiny_llama
from trainers import eval_metrics as em
from trainers.evaluate import evaluate, load_items, teacher_model_dir
from trainers.settings import EvalSettings

PROMPTS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
    {"question": "Sara had 10 dollars and spent 4. How many dollars are left?", "answer": "#### 6"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two random tiny Llamas and three GSM8K-like prompts, shared by the module (each test has its own response cache)."""
    root = tmp_path_factory.mktemp("eval")
    students = []
    for seed in (0, 1):
        path = make_tiny_llama(root / f"tiny{seed}", seed=seed)
        # The tiny model's 256 positions are too few for a GSM8K prompt in its 400-token vocabulary; RoPE extends.
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = 2048
        (path / "config.json").write_text(json.dumps(config))
        students.append(path)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return {"root": root, "students": students, "prompts": prompts}


def config(setup, out, **kw) -> EvalSettings:
    base = dict(
        students=[str(p) for p in setup["students"]], teacher="embedded", prompts=setup["prompts"], output_dir=out,
        max_new_tokens=4, teacher_max_tokens=16, cache_dir=out.parent / "cache", template=None,
    )  # fmt: skip
    return EvalSettings(**(base | kw))


def test_every_metric_and_the_report(setup, tmp_path):
    tiny0, tiny1 = (str(p) for p in setup["students"])
    out = tmp_path / "eval"
    evaluate(config(setup, out, before=tiny1))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["prompts"] == 3 and len(saved["items"]) == 3
    teacher = saved["teacher"]
    assert teacher["requests_sent"] == 3
    floor = teacher["nll"]
    assert floor is not None and math.isfinite(floor) and floor > 0
    rows = {m["name"]: m for m in saved["models"]}
    assert set(rows) == {"tiny0", "tiny1"} and rows["tiny1"]["role"] == "before"  # listed once though given twice
    for row in rows.values():
        for key in ("accuracy", "agreement", "answered", "nll", "nll_per_byte", "nll_gap", "gap_closed"):
            assert key in row, key
        assert 0 <= row["accuracy"] <= 1 and row["accuracy_n"] == 3
        assert math.isfinite(row["nll"]) and math.isfinite(row["nll_per_byte"]) and row["nll_tokens"] > 0
        assert floor < row["nll"]  # the teacher predicts its own answers far better than a random tiny model
    assert rows["tiny1"]["gap_closed"] == 0
    expected = (rows["tiny1"]["nll"] - rows["tiny0"]["nll"]) / (rows["tiny1"]["nll"] - floor)
    assert rows["tiny0"]["gap_closed"] == pytest.approx(expected)
    for item in saved["items"]:
        assert item["teacher"]["text"] and item["reference"] in {"7", "12", "6"}
        assert all(math.isfinite(m["nll"]) for m in item["models"].values())

    report = (out / "report.md").read_text()
    assert "| tiny1 (before) |" in report and "| tiny0 |" in report and "(floor)" in report
    for png in ("accuracy.png", "nll.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report


def test_judge_with_order_swap_and_a_free_rerun_on_the_command_line(setup, tmp_path, capsys):
    from distill.cli import main

    out = tmp_path / "judged"
    argv = [
        "eval", "--students", str(setup["students"][0]), "--prompts", str(setup["prompts"]), "--limit", "2",
        "--max-new-tokens", "4", "--teacher-max-tokens", "16", "--judge", "embedded", "--judge-max-tokens", "4",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--template", "none",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny0" in printed and "report:" in printed
    saved = json.loads((out / "eval.json").read_text())
    judge = saved["models"][0]["judge"]
    # Whatever a 135M judge replies, every pair ends as a win, a tie or a loss: junk is a tie, not a crash.
    assert judge["wins"] + judge["ties"] + judge["losses"] == 2 and 0 <= judge["win_rate"] <= 1
    assert saved["judge"]["requests_sent"] + saved["judge"]["cache_hits"] == 4
    for item in saved["items"]:
        assert len(item["models"]["tiny0"]["judge"]["replies"]) == 2
    assert (out / "judge.png").stat().st_size > 1000
    assert main(argv) == 0  # a rerun asks neither the teacher nor the judge again
    again = json.loads((out / "eval.json").read_text())
    assert again["teacher"]["requests_sent"] == 0 and again["teacher"]["cache_hits"] == 2
    assert again["judge"]["requests_sent"] == 0 and again["judge"]["cache_hits"] == 4
    assert [it["teacher"] for it in again["items"]] == [it["teacher"] for it in saved["items"]]
    assert again["models"][0]["nll"] == pytest.approx(saved["models"][0]["nll"])


def test_judge_verdicts_and_order_swap():
    assert [em.judge_verdict(r) for r in ("A", "B.", "**B**", "(A)", "Answer: B", "Answer B is better.")] == list("ABBABB")
    for junk in ("", "A better answer is B", "answer A is worse than answer B", "Bob", "I cannot say"):
        assert em.judge_verdict(junk) is None, junk
    # Order 1 puts the student first (A), order 2 puts it second (B).
    assert em.combine_verdicts("A", "B") == "win"
    assert em.combine_verdicts("B", "A") == "loss"
    assert em.combine_verdicts("A", "A") == "tie"  # always prefers the first answer: position bias, not a verdict
    assert em.combine_verdicts(None, "B") == "tie"
    assert em.win_rate(["win", "tie", "loss", "win"]) == {"win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1}


def test_answer_checks_and_gap_closed():
    from synth.filters.verify import get_checker

    checker = get_checker("numeric")
    assert em.answer_of("3 + 4 = 7 apples.\nAnswer: 7", "numeric", "7") == "7"
    assert em.answer_of("so he has 7", "numeric", "7") == "7"  # the last number, for numeric tasks
    assert em.answer_of("blue", "exact", "red") is None
    assert em.same(checker, "$7.00", "7") and not em.same(checker, None, "7") and not em.same(checker, "8", "7")
    assert em.gap_closed(6.0, 4.0, 2.0) == 0.5
    assert em.gap_closed(6.0, 2.0, 2.0) == 1.0
    assert em.gap_closed(6.0, 7.0, 2.0) == -0.25  # got worse
    assert em.gap_closed(2.0, 1.0, 2.0) is None  # no gap to close
    assert em.rate([]) is None


def test_prompt_shapes_and_bad_prompt_files(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"question": "What is 2 + 2?", "answer": "#### 4"},
        {"prompt": "Name a color.", "reference": "red"},
        {"id": "chat", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(EvalSettings(prompts=path, template=None))
    assert [it.reference for it in items] == ["4", "red", None]
    assert items[0].messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert items[2].id == "chat" and items[2].question == "1 + 1?" and len(items[2].messages) == 2
    templated = load_items(EvalSettings(prompts=path, limit=1))
    assert "What is 2 + 2?" in templated[0].messages[0]["content"] and "Answer:" in templated[0].messages[0]["content"]
    assert [it.id for it in load_items(EvalSettings(prompts=path, skip=1, limit=1))] == ["2"]
    demos = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "demonstrations.jsonl"
    shown = load_items(EvalSettings(prompts=path, limit=1, demonstrations=demos))[0].messages
    labeled = LabelGenerator(LabelOptions(demonstrations=demos), "x").messages(LabelInput(question="What is 2 + 2?"), "p.jsonl:1")
    assert shown == [m.model_dump() for m in labeled] and "Steve finds 100 gold bars" in shown[0]["content"], "the prompt labeling used"
    plain = tmp_path / "plain.jinja"
    plain.write_text("{{ question }}")
    with pytest.raises(ConfigError, match="does not show demonstrations"):
        load_items(EvalSettings(prompts=path, limit=1, template=str(plain), demonstrations=demos))
    with pytest.raises(ConfigError, match="does not show demonstrations"):
        LabelGenerator(LabelOptions(template=str(plain), demonstrations=demos), "x")
    path.write_text(json.dumps({"text": "no question here"}) + "\n")
    with pytest.raises(InputError, match=r"p.jsonl:1: needs a 'question' or a 'prompt'"):
        load_items(EvalSettings(prompts=path))
    assert teacher_model_dir("openai:gpt-4o-mini@http://127.0.0.1:9/v1") is None
    assert (teacher_model_dir("embedded") / "config.json").is_file()

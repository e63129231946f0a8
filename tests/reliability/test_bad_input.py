"""Bad input of every kind: one clear line naming file:line (or the key), exit 1, no partial output, earlier output untouched.

Small text fixtures live in tests/data/bad/; big or binary ones are made here, in tmp_path.
Cases already in tests/test_generate_cli.py (an empty file, a bad line in a short file) are not repeated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cli import main as distill_main
from tests.conftest import free_port
from tests.fault_server import FaultServer
from tests.reliability.harness import run_cli

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
EARLIER = '{"id": "earlier", "kind": "sft", "note": "written by an earlier run"}\n'


def _with_earlier_output(tmp_path: Path) -> Path:
    """An output directory holding what an earlier run wrote to the same paths."""
    out = tmp_path / "out" / "out.jsonl"
    out.parent.mkdir()
    out.write_text(EARLIER)
    out.with_name("out.rejects.jsonl").write_text("")
    return out


def _assert_untouched(out: Path) -> None:
    assert out.read_text() == EARLIER and out.with_name("out.rejects.jsonl").read_text() == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl", "out.rejects.jsonl"], "no partial or temp file"


def _fifty_mb_array(tmp_path: Path) -> Path:
    # The usual mistake: a whole dataset as one JSON array on one line.
    path = tmp_path / "one_line.jsonl"
    row = json.dumps({"prompt": "x" * 1000})
    with path.open("w") as fh:
        fh.write("[" + ",".join([row] * 50_000) + "]\n")
    assert path.stat().st_size > 50_000_000
    return path


def _non_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    return path


def _bom_mid_file(tmp_path: Path) -> Path:
    # A BOM on line 1 is harmless and accepted; one pasted in mid-file is an error on its line.
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\xef\xbb\xbf{"prompt": "b"}\n')
    return path


CASES = {
    "malformed": (lambda t: BAD / "malformed.jsonl", [], "malformed.jsonl:3: invalid JSON"),
    "wrong type": (lambda t: BAD / "wrong_types.jsonl", [], "wrong_types.jsonl:2: field 'prompt': Input should be a valid string"),
    "missing field": (lambda t: BAD / "missing_field.jsonl", [], "missing_field.jsonl:3: needs a 'prompt' string or a 'messages' list"),
    "blank lines only": (lambda t: BAD / "blank.jsonl", [], "blank.jsonl: file is empty"),
    "50 MB line": (_fifty_mb_array, [], "one_line.jsonl:1: expected a JSON object, got list"),
    "non-UTF-8": (_non_utf8, [], "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"),
    "BOM mid-file": (_bom_mid_file, [], "bom.jsonl:2: invalid JSON: Unexpected UTF-8 BOM"),
    "undefined template variable": (
        lambda t: BAD / "questions.jsonl", ["--template", str(BAD / "undefined_var.jinja")], "questions.jsonl:1: template"
    ),
    "missing model": (lambda t: BAD / "wrong_types.jsonl", ["--teacher", "hf:/no/such/model"], "/no/such/model': no such directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_1_and_nothing_written(tmp_path, capsys, monkeypatch, case):
    make, extra, message = CASES[case]
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    out = _with_earlier_output(tmp_path)
    teacher = ["--teacher", f"openai:m@http://127.0.0.1:{free_port()}/v1"]
    code = distill_main(["generate", *teacher, "--input", str(make(tmp_path)), "--output", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and err.count("\n") == 1 and len(err) < 400, err
    _assert_untouched(out)


def test_refused_connection_leaves_no_journal_and_the_earlier_output(tmp_path):
    out = _with_earlier_output(tmp_path)
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    result = run_cli("generate", "--teacher", f"openai:m@http://127.0.0.1:{free_port()}/v1", "--max-retries", "0",
                     "--input", str(prompts), "--output", str(out), "--quiet", cache=tmp_path / "cache")
    assert result.returncode == 1 and "connection failed" in result.stderr and result.stderr.count("\n") == 1
    _assert_untouched(out)


@pytest.mark.parametrize(
    "recipe, message",
    [
        ("recipe_unknown_key.yaml", "recipe_unknown_key.yaml: stage 'answers' (generate): unknown key 'temprature'"),
        ("recipe_wrong_type.yaml", "recipe_wrong_type.yaml: stage 'answers': key 'max_tokens': Input should be a valid integer"),
        ("recipe_bad_yaml.yaml", "recipe_bad_yaml.yaml:4: not valid YAML"),
    ],
)
def test_bad_recipe_fails_before_any_work(tmp_path, capsys, monkeypatch, recipe, message):
    monkeypatch.setenv("BAD", str(BAD))
    monkeypatch.setenv("OUT", str(tmp_path / "run"))
    code = distill_main(["run", str(BAD / recipe)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.jsonl"))


def test_recipe_with_a_missing_stage_input_keeps_the_stages_before_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with FaultServer() as server:
        env = {"BAD": str(BAD), "OUT": str(run), "TEACHER": f"openai:echo@{server.base_url}"}
        result = run_cli("run", str(BAD / "recipe_missing_input.yaml"), cache=tmp_path / "cache", env=env)
    assert result.returncode == 1
    assert "no_such_prompts.jsonl: no such file" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "stage more failed (exit 1)" in result.stdout
    assert len((run / "answers.jsonl").read_text().splitlines()) == 2, "the finished stage's output is intact"
    assert not list(run.glob("more*")), "the failed stage left nothing"


def test_training_a_model_that_does_not_exist(tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"kind": "sft", "id": "a", "provenance": {"teacher": "t", "method": "m", "task": "a"},
                                   "prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}) + "\n")
    result = run_cli("train", "sft", "--model", str(tmp_path / "nope"), "--data", str(records), "--output-dir", str(tmp_path / "student"),
                     cache=tmp_path / "cache")
    assert result.returncode == 1 and "nope': no Hugging Face model directory there" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "student").exists()

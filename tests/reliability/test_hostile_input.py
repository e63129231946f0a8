"""Hostile input is refused before the first request: one line naming file:line and field, exit 1, nothing paid, nothing written.

Every case runs against tests/fault_server.py, whose request counter proves that no request
was paid. Cases that could hang or eat memory if a limit were missing (YAML alias bombs,
Jinja loops and repeats) run `distill` as a child with a timeout and a memory cap, so a
regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import main as distill_main
from synth.errors import InputError
from tests.fault_server import FaultServer
from tests.reliability.harness import ROOT, cli_env

DEEP = 100_000
HUGE_INT = "9" * 5000


def _line(obj) -> str:
    # ensure_ascii keeps a lone surrogate as the JSON escape "\ud800", as a careless exporter writes it.
    return json.dumps(obj) + "\n"


def _good(count: int) -> str:
    return "".join(_line({"prompt": f"question {i}"}) for i in range(count))


# name -> (input file text, what the one error line must contain); "{in}" is the input's name.
INPUTS = {
    "lone surrogate on line 301": (_good(300) + _line({"prompt": "caf\ud800"}), "in.jsonl:301: field 'prompt': "),
    "lone surrogate in messages[].content": (
        _good(1) + _line({"messages": [{"role": "user", "content": "a\udc00b"}]}), "in.jsonl:2: field 'messages.0.content': "
    ),
    "lone surrogate in a key": (_good(1) + _line({"prompt": "p", "x\ud800": 1}), "in.jsonl:2: field 'x\\ud800': "),
    "empty prompt": (_good(2) + _line({"prompt": ""}), "in.jsonl:3: field 'prompt': "),
    "whitespace-only prompt": (_good(2) + _line({"prompt": " \n\t "}), "in.jsonl:3: field 'prompt': "),
    "messages []": (_good(2) + _line({"messages": []}), "in.jsonl:3: field 'messages': "),
    "messages with whitespace content": (
        _good(2) + _line({"messages": [{"role": "user", "content": "   "}]}), "in.jsonl:3: field 'messages.0.content': "
    ),
    "messages without a user turn": (
        _good(2) + _line({"messages": [{"role": "system", "content": "be brief"}]}), "in.jsonl:3: field 'messages': "
    ),
    "list nested 100k deep": (_good(2) + "[" * DEEP + "]" * DEEP + "\n", "in.jsonl:3: nested deeper than"),
    "prompt nested 100k deep": (
        _good(2) + '{"prompt": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}\n", "in.jsonl:3: nested deeper than"
    ),
    "prompt nested 150 deep": (_good(2) + '{"prompt": "p", "x": ' + "[" * 150 + "]" * 150 + "}\n", "in.jsonl:3: nested deeper than"),
    "5,000-digit integer": (_good(2) + '{"prompt": "p", "n": ' + HUGE_INT + "}\n", "in.jsonl:3: a number with more than"),
}


def _generate(tmp_path: Path, server: FaultServer, *args: str) -> int:
    return distill_main(["generate", "--teacher", f"openai:echo@{server.base_url}", "--max-retries", "0",
                         "--output", str(tmp_path / "out.jsonl"), "--quiet", *args])  # fmt: skip


def _assert_refused(tmp_path: Path, server: FaultServer, code: int, err: str, message: str) -> None:
    assert code == 1, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert len(err) < 500, err[:2000]
    assert server.received == 0, "no request may be paid before the input is validated"
    assert not list(tmp_path.glob("out*")), "nothing written"


@pytest.mark.parametrize("case", list(INPUTS))
def test_bad_input_line_is_refused_before_any_request(tmp_path, capsys, monkeypatch, case):
    text, message = INPUTS[case]
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "in.jsonl"
    path.write_text(text, encoding="utf-8")
    with FaultServer() as server:
        code = _generate(tmp_path, server, "--input", str(path))
        _assert_refused(tmp_path, server, code, capsys.readouterr().err, message)


def _directory(tmp_path: Path) -> str:
    (tmp_path / "in.jsonl").mkdir()
    return str(tmp_path / "in.jsonl")


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "in.jsonl")  # opening it would block until a writer came: it must not be opened
    return str(tmp_path / "in.jsonl")


INPUT_PATHS = {
    "a directory as --input": (_directory, "in.jsonl: is a directory"),
    "a named pipe as --input": (_fifo, "in.jsonl: is not a regular file"),
    "stdin (-) as --input": (lambda t: "-", "--input -: reading standard input is not supported"),
}


@pytest.mark.parametrize("case", list(INPUT_PATHS))
def test_input_that_is_not_a_regular_file(tmp_path, capsys, monkeypatch, case):
    make, message = INPUT_PATHS[case]
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    with FaultServer() as server:
        code = _generate(tmp_path, server, "--input", make(tmp_path))
        _assert_refused(tmp_path, server, code, capsys.readouterr().err, message)


SCHEMAS = {
    "schema with an unknown type": ('{"type": "objekt"}', "schema.json: not a valid JSON Schema: "),
    "schema that is a list": ('[{"type": "object"}]', "schema.json: not a valid JSON Schema: "),
    "schema that is not JSON": ("type: object\n", "schema.json: not a readable JSON Schema file: "),
    "schema nested 100k deep": ('{"a": ' * DEEP + "1" + "}" * DEEP, "schema.json: not a readable JSON Schema file: "),
    "schema with a bad pattern": ('{"type": "string", "pattern": "(unclosed"}', "schema.json: not a valid JSON Schema: "),
}


@pytest.mark.parametrize("case", list(SCHEMAS))
def test_invalid_json_schema_is_refused_before_any_request(tmp_path, capsys, monkeypatch, case):
    schema, message = SCHEMAS[case]
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "schema.json").write_text(schema)
    (tmp_path / "in.jsonl").write_text(_good(3))
    with FaultServer() as server:
        code = _generate(tmp_path, server, "--input", str(tmp_path / "in.jsonl"), "--json-schema", str(tmp_path / "schema.json"))
        _assert_refused(tmp_path, server, code, capsys.readouterr().err, message)


def raising_checker(predicted: str, reference: str) -> bool:
    """A --checker that fails on use."""
    raise ValueError("cannot compare " + predicted)


def no_argument_checker() -> bool:
    """A --checker with the wrong signature."""
    return True


CHECKERS = {
    "unknown checker name": ("numerik", "unknown checker 'numerik'"),
    "checker module missing": ("no_such_module_xyz:check", "checker 'no_such_module_xyz:check': cannot import it"),
    "checker module fails on import": ("broken_checker_module:check", "checker 'broken_checker_module:check': cannot import it (ZeroDivisionError"),
    "checker that raises on use": (f"{__name__}:raising_checker", "in.jsonl:1's reference answer: ValueError: cannot compare 2"),
    "checker with the wrong signature": (f"{__name__}:no_argument_checker", "in.jsonl:1's reference answer: TypeError: no_argument_checker() takes 0 positional arguments"),
}


@pytest.mark.parametrize("case", list(CHECKERS))
def test_failing_checker_is_found_before_any_request(tmp_path, capsys, monkeypatch, case):
    checker, message = CHECKERS[case]
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "broken_checker_module.py").write_text("1 / 0\n\ndef check(a, b):\n    return a == b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "in.jsonl").write_text(_line({"question": "1 + 1?", "answer": "2"}) + _line({"question": "2 + 2?", "answer": "4"}))
    with FaultServer() as server:
        code = distill_main(["label", "--teacher", f"openai:echo@{server.base_url}", "--max-retries", "0", "-n", "1",
                             "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                             "--checker", checker, "--quiet"])  # fmt: skip
        _assert_refused(tmp_path, server, code, capsys.readouterr().err, message)


def test_failing_checker_of_self_knowledge_is_found_before_any_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "in.jsonl").write_text(_good(2))
    with FaultServer() as server:
        code = distill_main(["self", "--student", f"openai:echo@{server.base_url}", "--judge-by", "consistency",
                             "--checker", f"{__name__}:raising_checker", "--input", str(tmp_path / "in.jsonl"),
                             "--output", str(tmp_path / "out.jsonl"), "--quiet"])  # fmt: skip
        _assert_refused(tmp_path, server, code, capsys.readouterr().err, "raising_checker' fails on a sample answer: ValueError")


def test_duplicate_inputs_are_reported_as_duplicates_not_resumed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "in.jsonl").write_text(_line({"prompt": "a"}) + _line({"prompt": "b"}) + _line({"prompt": "a"}) + _line({"prompt": "a"}))
    with FaultServer() as server:
        code = _generate(tmp_path, server, "--input", str(tmp_path / "in.jsonl"))
        out = capsys.readouterr().out
        assert code == 0 and server.received == 2, out
    assert "2 duplicate inputs (the same task as an earlier line) done once" in out and "resumed" not in out, out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_resumed_and_duplicate_inputs_are_told_apart(tmp_path, capsys, monkeypatch):
    from synth.journal import TaskJournal

    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "in.jsonl").write_text(_line({"prompt": "a"}) + _line({"prompt": "b"}) + _line({"prompt": "a"}))
    add = TaskJournal.add

    def interrupted_after_the_first_task(self, *args, **kwargs):
        add(self, *args, **kwargs)
        monkeypatch.setattr(TaskJournal, "add", add)
        raise KeyboardInterrupt

    monkeypatch.setattr(TaskJournal, "add", interrupted_after_the_first_task)
    with FaultServer() as server:
        args = ("--input", str(tmp_path / "in.jsonl"), "--concurrency", "1", "--batch-size", "1")
        assert _generate(tmp_path, server, *args) == 130
        assert server.received == 1
        capsys.readouterr()
        assert _generate(tmp_path, server, *args) == 0
        stdout = capsys.readouterr().out
        assert server.received == 2, stdout
    assert "1 resumed from an earlier run" in stdout and "1 duplicate input (the same task as an earlier line) done once" in stdout, stdout


# -- readers of training data ----------------------------------------------------------------------
TRAIN_ROWS = {
    "record nested 100k deep": ('{"messages": ' + "[" * DEEP + "]" * DEEP + "}\n", "data.jsonl:2: nested deeper than"),
    "record with a 5,000-digit integer": ('{"id": ' + HUGE_INT + ', "messages": []}\n', "data.jsonl:2: a number with more than"),
    "record with a lone surrogate": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}\n',
        "data.jsonl:2: field 'messages.1.content': ",
    ),
}
_SFT_ROW = _line({"kind": "sft", "id": "a", "provenance": {"teacher": "t", "method": "m", "task": "a"},
                  "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})  # fmt: skip


@pytest.mark.parametrize("case", list(TRAIN_ROWS))
def test_sft_data_reader_names_the_line(tmp_path, case):
    from trainers.common import load_records

    row, message = TRAIN_ROWS[case]
    (tmp_path / "data.jsonl").write_text(_SFT_ROW + row)
    with pytest.raises(InputError, match=None) as err:
        load_records(tmp_path / "data.jsonl", set())
    assert message in str(err.value)


@pytest.mark.parametrize("case", list(TRAIN_ROWS))
def test_kd_soft_label_reader_names_the_line(tmp_path, case):
    from trainers.kd_data import read_soft_labels

    row, message = TRAIN_ROWS[case]
    (tmp_path / "data.jsonl").write_text(_SFT_ROW + row)
    with pytest.raises(InputError) as err:
        read_soft_labels(tmp_path / "data.jsonl", tokenizer=[None] * 8, max_positions=4)
    assert message in str(err.value)


# -- resource bombs: run as a bounded child -------------------------------------------------------
def _bounded(*args: str, cache: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`distill ARGS` in a child capped at 2 GiB of memory and `timeout` seconds."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=cli_env(cache, env),
                          timeout=timeout, cwd=ROOT, preexec_fn=cap)  # fmt: skip


def _assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


def _bomb(leaf: str, indent: str = "") -> str:
    """A "billion laughs": ten anchors, each a list of nine aliases of the one before (9**9 leaves expanded)."""
    lines = [f"{indent}a: &a [" + ", ".join([leaf] * 9) + "]"]
    lines += [f"{indent}{chr(c)}: &{chr(c)} [" + ", ".join([f"*{chr(c - 1)}"] * 9) + "]" for c in range(ord("b"), ord("j") + 1)]
    return "\n".join(lines) + "\n"


def _teacher_bomb(tmp_path: Path, server: FaultServer) -> list[str]:
    (tmp_path / "teacher.yaml").write_text(f"backend: openai\nmodel: echo\nbase_url: {server.base_url}\nengine_args:\n{_bomb('lol', '  ')}")
    return ["generate", "--teacher", str(tmp_path / "teacher.yaml"), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]


def _config_bomb(tmp_path: Path, server: FaultServer) -> list[str]:
    (tmp_path / "label.yaml").write_text(_bomb("{question: q, answer: a}") + "demonstrations: *j\n")
    return ["label", "--teacher", f"openai:echo@{server.base_url}", "--config", str(tmp_path / "label.yaml"),
            "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]  # fmt: skip


def _taxonomy_bomb(tmp_path: Path, server: FaultServer) -> list[str]:
    # Topics nine wide and ten deep, every level the same list of subtopics.
    levels = ["x0: &x0 [" + ", ".join(["{name: t}"] * 9) + "]"]
    levels += [f"x{i}: &x{i} [" + ", ".join([f"{{name: t, subtopics: *x{i - 1}}}"] * 9) + "]" for i in range(1, 10)]
    (tmp_path / "tax.yaml").write_text("\n".join(levels) + "\ntopics: *x9\ntask_types: [q]\ndifficulty_levels: [easy]\n")
    return ["curate", "--teacher", f"openai:echo@{server.base_url}", "--taxonomy", str(tmp_path / "tax.yaml"), "--output", str(tmp_path / "out.jsonl")]


def _recipe_bomb(tmp_path: Path, server: FaultServer) -> list[str]:
    (tmp_path / "recipe.yaml").write_text(
        f"name: bomb\nwork_dir: {tmp_path}/run\nteacher: openai:echo@{server.base_url}\nvars:\n{_bomb('lol', '  ')}"
        f"stages:\n  - name: s\n    command: generate\n    input: {tmp_path}/in.jsonl\n    output: {tmp_path}/out.jsonl\n    stop: *j\n"
    )
    return ["run", str(tmp_path / "recipe.yaml")]


def _recursive_alias(tmp_path: Path, server: FaultServer) -> list[str]:
    (tmp_path / "teacher.yaml").write_text(f"backend: openai\nmodel: echo\nbase_url: {server.base_url}\nengine_args: &s {{a: *s}}\n")
    return ["generate", "--teacher", str(tmp_path / "teacher.yaml"), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]


def _deep_yaml(tmp_path: Path, server: FaultServer) -> list[str]:
    (tmp_path / "teacher.yaml").write_text(f"backend: openai\nmodel: echo\nbase_url: {server.base_url}\nengine_args: {{a: " + "[" * DEEP + "]" * DEEP + "}}\n")
    return ["generate", "--teacher", str(tmp_path / "teacher.yaml"), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]


YAML_BOMBS = {
    "alias bomb in a teacher file": (_teacher_bomb, "teacher.yaml: refused: "),
    "alias bomb in --config": (_config_bomb, "label.yaml: refused: "),
    "alias bomb in a taxonomy": (_taxonomy_bomb, "tax.yaml: refused: "),
    "alias bomb in a recipe": (_recipe_bomb, "recipe.yaml: refused: "),
    "recursive alias in a teacher file": (_recursive_alias, "teacher.yaml: refused: an alias refers to itself"),
    "YAML nested 100k deep": (_deep_yaml, "teacher.yaml: refused: nested deeper than"),
}


@pytest.mark.parametrize("case", list(YAML_BOMBS))
def test_yaml_bomb_stops_with_a_limit(tmp_path, case):
    make, message = YAML_BOMBS[case]
    (tmp_path / "in.jsonl").write_text(_line({"question": "1 + 1?", "prompt": "hi"}))
    with FaultServer() as server:
        result = _bounded(*make(tmp_path, server), cache=tmp_path / "cache")
        _assert_one_line(result, message)
        assert server.received == 0


def test_ordinary_anchors_and_aliases_still_load(tmp_path):
    from synth import safe_yaml
    from synth.teachers.config import load_teacher_file

    shared = "defaults: &d {temperature: 0.2, stop: [a, b]}\nfirst: *d\nsecond: {<<: *d, temperature: 0.5}\n"
    assert safe_yaml.load(shared, "x.yaml")["second"] == {"temperature": 0.5, "stop": ["a", "b"]}
    (tmp_path / "teacher.yaml").write_text("engine_args: &e {max_model_len: 512}\nbackend: vllm\nmodel: m\n")
    assert load_teacher_file(tmp_path / "teacher.yaml").engine_args == {"max_model_len": 512}


TEMPLATES = {
    "huge range": ("{% for i in range(10**9) %}x{% endfor %}", 1, "Range too big"),
    "nested ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", 1, "loops ran more than 100,000 times"),
    "huge string repeat": ('{{ "x" * 10**9 }}', 1, "'*' would make a value of more than 1,000,000"),
    "huge power": ("{{ 10 ** (10 ** 10) }}", 1, "'**' would make a value of more than 1,000,000"),
    "doubling string": ('{% set ns = namespace(s="xx") %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}',
                        1, "a value of more than 1,000,000 characters"),  # fmt: skip
    "padding filter": ('{{ prompt|center(10**9) }}', 1, "a value of more than 1,000,000 characters"),
    "recursive macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", 1, "calls nested too deeply"),
    "division by zero": ("{{ prompt }} {{ 1 / 0 }}", 1, "t.jinja: division by zero"),
    "division by zero on line 2": ("{{ prompt }} {{ 10 // n }}", 2, "t.jinja: integer division or modulo by zero"),
    "renders to nothing": ("{{ prompt|trim }}", 3, "t.jinja: renders empty text"),
    "include": ('{% include "/etc/passwd" %}', None, "t.jinja:1: {% include %} is not supported"),
    "import": ('{% import "other.jinja" as o %}{{ prompt }}', None, "t.jinja:1: {% import %} is not supported"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_template_bomb_or_runtime_error_is_found_before_any_request(tmp_path, case):
    source, line, message = TEMPLATES[case]
    (tmp_path / "t.jinja").write_text(source)
    (tmp_path / "in.jsonl").write_text(_line({"prompt": "hi", "n": 1}) + _line({"prompt": "ho", "n": 0}) + _line({"prompt": "  ", "n": 2}))
    with FaultServer() as server:
        result = _bounded("generate", "--teacher", f"openai:echo@{server.base_url}", "--template", str(tmp_path / "t.jinja"),
                          "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), cache=tmp_path / "cache")  # fmt: skip
        _assert_one_line(result, message)
        if line is not None:  # found while checking the input lines: the line that set it off is named
            assert f"in.jsonl:{line}: template " in result.stderr
        assert server.received == 0
    assert not (tmp_path / "out.jsonl").exists()

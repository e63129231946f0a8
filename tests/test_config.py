"""Teacher specs, teacher YAML files and templates."""

from __future__ import annotations

import pytest

from synth.errors import ConfigError, InputError
from synth.prompts import load_template
from synth.teachers import parse_teacher_spec


def test_teacher_specs():
    assert parse_teacher_spec(None).model == "embedded"
    assert parse_teacher_spec("embedded").backend == "transformers"
    hf = parse_teacher_spec("hf:/models/student")
    assert (hf.backend, hf.model) == ("transformers", "/models/student")
    vl = parse_teacher_spec("vllm:Qwen/Qwen3-8B")
    assert (vl.backend, vl.model) == ("vllm", "Qwen/Qwen3-8B")
    oa = parse_teacher_spec("openai:gpt-4o-mini@https://api.example.com/v1")
    assert (oa.backend, oa.model, oa.base_url) == ("openai", "gpt-4o-mini", "https://api.example.com/v1")
    for bad in ("gpt4", "openai:", "ollama:llama3"):
        with pytest.raises(ConfigError, match="unknown teacher spec"):
            parse_teacher_spec(bad)


def test_teacher_yaml(tmp_path):
    good = tmp_path / "t.yaml"
    good.write_text("teacher:\n  backend: openai\n  model: m\n  base_url: http://127.0.0.1:1/v1\n  concurrency: 8\n")
    assert parse_teacher_spec(str(good)).concurrency == 8
    typo = tmp_path / "typo.yaml"
    typo.write_text("backend: openai\nconcurency: 8\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: key 'concurency': unknown key"):
        parse_teacher_spec(str(typo))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("backend: openai\ntimeout: soon\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: key 'timeout': Input should be a valid number"):
        parse_teacher_spec(str(wrong))
    with pytest.raises(ConfigError, match="teacher file not found"):
        parse_teacher_spec(str(tmp_path / "absent.yaml"))


def test_templates_render_strictly_in_a_sandbox(tmp_path):
    cot = load_template("label/cot", "en")
    text = cot.render(question="What is 2+3?")
    assert "What is 2+3?" in text and "Answer:" in text
    assert "问题" in load_template("label/cot", "zh").render(question="1+1?")
    with pytest.raises(InputError, match=r"in\.jsonl:4: template label/cot: 'question' is undefined"):
        cot.render("in.jsonl:4", text="no question field")
    with pytest.raises(ConfigError, match="not found"):
        load_template("label/nope")
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ConfigError, match=r"evil\.jinja: refused by the sandbox: access to attribute '__class__'"):
        load_template(str(evil)).render()

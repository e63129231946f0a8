"""KD's checks of the teacher's tokenizer and prompt rendering: nameless (HTTP) soft labels, a wrong vocabulary, another chat template."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from synth.errors import ConfigError
from tests.test_train_kd import kd_settings, write_kd_records
from tests.tiny_models import CHATML, make_tiny_llama

#: ChatML that, like Qwen2.5's template, puts a default system message before a chat that has none.
DEFAULT_SYSTEM = "You are Tiny, made by the test suite. You are a helpful assistant."
INJECTING = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}" + CHATML
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A teacher, a student with the same tokenizer and template, one whose template injects a system prompt, one with another vocabulary."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("kdtok")
    out = {"teacher": make_tiny_llama(root / "teacher", seed=0), "student": make_tiny_llama(root / "student", seed=1)}
    out["injecting"] = make_tiny_llama(root / "injecting", seed=1)
    tok = AutoTokenizer.from_pretrained(str(out["injecting"]))
    tok.chat_template = INJECTING
    tok.save_pretrained(str(out["injecting"]))
    out["other"] = make_tiny_llama(root / "other", seed=2)
    tok = AutoTokenizer.from_pretrained(str(out["other"]))
    tok.add_tokens(["zebra"])
    tok.save_pretrained(str(out["other"]))
    return out


def cli(*args) -> int:
    from distill.cli import main

    return main(["train", "kd", *map(str, args)])


def rewrite(path, edit):
    """Apply `edit(index, record)` to every record of a JSON Lines file."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i, record in enumerate(records):
        edit(i, record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- soft labels that name no tokenizer


def test_soft_labels_naming_no_tokenizer_are_refused_in_one_line(models, tmp_path, capsys):
    data = write_kd_records(tmp_path / "http.jsonl", models["teacher"], 4, strings=True)  # tokenizer: null, as an HTTP teacher
    code = cli("--model", models["student"], "--data", data, "--output-dir", tmp_path / "o", "--max-steps", "1", "--max-length", "64")
    err = capsys.readouterr().err
    assert code == 1, err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "http.jsonl" in line and "4 of 4 records name no tokenizer" in line, line
    assert "`tokenizer:` in the teacher file" in line and "--token-strings-only" in line and "--teacher-tokenizer" in line, line
    assert not (tmp_path / "o").exists()


def test_token_strings_only_trains_on_them(models, tmp_path, capsys):
    data = write_kd_records(tmp_path / "http.jsonl", models["teacher"], 4, strings=True)
    out = tmp_path / "o"
    code = cli("--model", models["student"], "--data", data, "--output-dir", out, "--max-steps", "1", "--batch-size", "2",
               "--max-length", "64", "--warmup-ratio", "0", "--token-strings-only")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["final"]["kd_rows_train_ok"] == 4


def test_a_file_mixing_named_and_nameless_soft_labels_is_refused(models, tmp_path):
    from trainers.kd import build_trainer

    data = write_kd_records(tmp_path / "mixed.jsonl", models["teacher"], 4, strings=True)
    rewrite(data, lambda i, r: r["soft_labels"].update(tokenizer=str(models["teacher"])) if i else None)
    with pytest.raises(ConfigError, match=r"mixed.jsonl: the soft labels of 1 of 4 records name no tokenizer"):
        build_trainer(kd_settings(models["student"], data, tmp_path / "o"))
    # Naming the teacher's tokenizer directory vouches for all of them.
    _, _, note = build_trainer(kd_settings(models["student"], data, tmp_path / "o", teacher_tokenizer=str(models["teacher"])))
    assert "vocabulary hash" in note


def test_http_soft_labels_naming_a_tokenizer_directory_with_another_vocabulary_are_refused(models, tmp_path, capsys):
    data = write_kd_records(tmp_path / "http.jsonl", models["teacher"], 4, strings=True)
    rewrite(data, lambda i, r: r["soft_labels"].update(tokenizer=str(models["other"])))  # the teacher file's `tokenizer:`
    code = cli("--model", models["student"], "--data", data, "--output-dir", tmp_path / "o", "--max-steps", "1", "--max-length", "64")
    err = capsys.readouterr().err
    assert code == 1 and "is not the teacher's" in err and "other" in err, err
    # The same records naming the student's own tokenizer directory pass the check and train on the strings.
    rewrite(data, lambda i, r: r["soft_labels"].update(tokenizer=str(models["teacher"])))
    code = cli("--model", models["student"], "--data", data, "--output-dir", tmp_path / "o", "--max-steps", "1", "--max-length", "64",
               "--batch-size", "2", "--warmup-ratio", "0")  # fmt: skip
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------- prompt rendering


def test_a_student_template_that_injects_a_default_system_prompt_is_warned_about(models, tmp_path, caplog):
    from trainers.kd import build_trainer

    data = write_kd_records(tmp_path / "http.jsonl", models["teacher"], 4, strings=True)
    rewrite(data, lambda i, r: r["provenance"].update(teacher="openai:gpt-4o-mini"))
    with caplog.at_level(logging.WARNING, logger="trainers.kd"):
        trainer, _, _ = build_trainer(kd_settings(models["injecting"], data, tmp_path / "o", token_strings_only=True, max_length=128))
    assert len(trainer.train_dataset) == 4  # the completion still aligns
    (warning,) = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert "\n" not in warning
    assert "default system prompt" in warning and DEFAULT_SYSTEM in warning and "openai:gpt-4o-mini" in warning, warning
    assert "4 of 4 records" in warning, warning


def test_a_student_template_unlike_the_named_teacher_tokenizers_is_warned_about(models, tmp_path, caplog):
    from trainers.kd import build_trainer

    data = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 4)  # names the teacher's directory
    with caplog.at_level(logging.WARNING, logger="trainers.kd"):
        build_trainer(kd_settings(models["injecting"], data, tmp_path / "o", max_length=128))
    (warning,) = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert "\n" not in warning and str(models["teacher"]) in warning and "record k0" in warning, warning
    assert "'<|im_start|>user" in warning and "'<|im_start|>system" in warning, warning  # what each side renders there


def test_no_warning_when_the_rendering_is_the_teachers_or_adds_nothing(models, tmp_path, caplog):
    from trainers.kd import build_trainer

    named = write_kd_records(tmp_path / "kd.jsonl", models["teacher"], 4)
    nameless = write_kd_records(tmp_path / "http.jsonl", models["teacher"], 4, strings=True)
    with caplog.at_level(logging.WARNING, logger="trainers.kd"):
        build_trainer(kd_settings(models["student"], named, tmp_path / "o"))
        build_trainer(kd_settings(models["student"], nameless, tmp_path / "o2", token_strings_only=True))
        # The teacher's own template injects the same default: it saw that context too.
        build_trainer(kd_settings(models["injecting"], named, tmp_path / "o3", teacher_tokenizer=str(models["injecting"]), max_length=128))
    assert not [r for r in caplog.records if "chat template" in r.getMessage()]


def test_default_system_prompt_detection(tmp_path):
    from tests.tiny_models import make_tokenizer
    from trainers.kd_data import default_system_prompt

    user = [{"role": "user", "content": "What color is the sky?"}]
    llama2 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
              "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}")  # fmt: skip
    tok = make_tokenizer(tmp_path)
    found = {}
    for name, template in {"injecting": INJECTING, "chatml": CHATML, "llama2": llama2, "none": None}.items():
        tok.chat_template = template
        found[name] = default_system_prompt(tok, user)
    assert found == {"injecting": DEFAULT_SYSTEM, "chatml": None, "llama2": None, "none": None}


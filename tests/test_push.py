"""`distill push`: what is checked before the network (no Hub here): type, path, repo id, token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.commands.push import check_repo, detect_type, read_token
from synth.errors import ConfigError


def test_detects_a_model_directory_and_a_dataset_folder(tmp_path):
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (model / "metrics.json").write_text("{}")  # trainers write JSON beside the model: still a model
    assert detect_type(model) == "model"
    data = tmp_path / "data"
    data.mkdir()
    (data / "gsm8k_cot.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    (data / "README.md").write_text("---\n---\n# card\n")
    assert detect_type(data) == "dataset"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="neither a model .* nor a dataset .*; pass --type"):
        detect_type(empty)


def test_a_missing_path_or_a_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        detect_type(tmp_path / "nope")
    file = tmp_path / "data.jsonl"
    file.write_text("{}\n")
    with pytest.raises(ConfigError, match="push a folder, not a file"):
        detect_type(file)


def test_repo_id_and_token_are_checked(monkeypatch):
    assert check_repo("my-org/gsm8k-cot") == "my-org/gsm8k-cot"
    for bad in ("gsm8k-cot", "a/b/c", "/name", "my org/x"):
        with pytest.raises(ConfigError, match="expected ORG/NAME"):
            check_repo(bad)
    monkeypatch.setenv("BBD_TEST_TOKEN", "  ")
    with pytest.raises(ConfigError, match=r"\$BBD_TEST_TOKEN is not set"):
        read_token("BBD_TEST_TOKEN")
    monkeypatch.setenv("BBD_TEST_TOKEN", "hf_abc")
    assert read_token("BBD_TEST_TOKEN") == "hf_abc"


def test_cli_without_a_token_fails_before_any_network_naming_the_variable(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "MY_HF_TOKEN")}
    run = subprocess.run([sys.executable, "-m", "distill", "push", str(data), "--repo", "org/name", "--token-env", "MY_HF_TOKEN"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert "$MY_HF_TOKEN is not set" in run.stderr and "Traceback" not in run.stderr
    missing = subprocess.run([sys.executable, "-m", "distill", "push", str(tmp_path / "gone"), "--repo", "org/name"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "no such file or directory" in missing.stderr

"""The `distill` CLI end to end on the real backends: embedded teacher, llama.cpp's server, help texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill.cli import build_parser


def distill(*args: str, cache, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=timeout)


def all_commands(parser) -> list[list[str]]:
    """Every command path, e.g. ["teacher", "check"], found by walking the subparsers."""
    import argparse

    found = []

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.append(prefix + [name])
                    walk(child, prefix + [name])

    walk(parser, [])
    return found


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = all_commands(parser)
    assert ["generate"] in commands and ["teacher", "check"] in commands
    for cmd in [[]] + commands:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*cmd, "--help"])
        assert exit_.value.code == 0
        assert "usage: distill" in capsys.readouterr().out


def test_generate_with_the_embedded_teacher_stores_soft_labels(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--template", "label/cot", "--input", str(prompts), "--output", str(out),
            "-n", "2", "--temperature", "0.8", "--seed", "1", "--max-tokens", "12", "--logprobs", "3", "--keep-truncated", "--quiet"]
    result = distill(*args, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and {r["provenance"]["sample"] for r in records} == {0, 1}
    for r in records:
        assert r["provenance"]["teacher"] == "transformers:embedded" and r["provenance"]["template"] == "label/cot"
        assert r["messages"][0]["content"].endswith("What is 2 + 3?") and r["messages"][-1]["role"] == "assistant"
        soft = r["soft_labels"]
        assert soft["tokenizer"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert 0 < len(soft["token_ids"]) <= 12 and all(len(top) == 3 for top in soft["top_ids"])
        assert all(lp[0] >= lp[1] >= lp[2] for lp in soft["top_logprobs"])
        assert r["meta"]["input"]["answer"] == "#### 5"
    again = distill(*args, cache=tmp_path / "cache")
    assert "0 requests sent, 2 samples from cache" in again.stdout


def test_teacher_check_against_llama_cpp_server(llama_server, tmp_path):
    result = distill("teacher", "check", "--teacher", f"openai:smollm2@{llama_server}", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "n > 1:        no" in result.stdout
    assert "logprobs:     yes" in result.stdout
    assert "json output:  json_object" in result.stdout
    assert "latency:" in result.stdout


def test_generate_through_llama_cpp_server(llama_server, tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is the capital of France? Answer in one word."}) + "\n")
    out = tmp_path / "out.jsonl"
    result = distill("generate", "--teacher", f"openai:smollm2@{llama_server}", "--input", str(prompts), "--output", str(out),
                     "-n", "2", "--seed", "3", "--max-tokens", "8", "--logprobs", "2", "--keep-truncated", "--quiet", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    assert all(r["soft_labels"]["top_tokens"] and r["soft_labels"].get("token_ids") is None for r in records)
    assert "paris" in " ".join(r["messages"][-1]["content"].lower() for r in records)

"""The shipped quickstart recipe, shortened with --set, end to end on the embedded teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHORT = [
    "--set", "label.limit=3", "--set", "sft.max_steps=2", "--set", "sft.batch_size=2",
    "--set", "eval.limit=2", "--set", "eval.max_new_tokens=24",
]  # fmt: skip


def run(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    argv = [sys.executable, "-m", "distill", "run", "recipes/quickstart.yaml", "--var", f"out={out}", *SHORT, *extra]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_shortened_quickstart_writes_every_artifact_and_a_rerun_does_nothing(tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    out, cache = tmp_path / "qs", tmp_path / "cache"
    first = run(out, cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    labeled = out / "labeled" / "data.jsonl"
    rows = [json.loads(line) for line in labeled.open()]
    assert rows and all(r["kind"] == "sft" and r["completion"][0]["content"].strip() for r in rows)
    assert "answer" in rows[0]["completion"][0]["content"].lower(), "kept answers state their answer"
    card = (out / "labeled" / "README.md").read_text()
    assert card.startswith("---") and "label" in card
    assert len(load_dataset(str(out / "labeled"), split="train")) == len(rows), "the folder loads as a dataset"
    for model_dir in ("student-before", "student-sft"):
        model = AutoModelForCausalLM.from_pretrained(out / model_dir)
        assert model.config.num_hidden_layers == 15, "half of the teacher's 30 layers"
    result = json.loads((out / "eval" / "eval.json").read_text())
    by_name = {m["name"]: m for m in result["models"]}
    assert result["prompts"] == 2 and result["teacher"]["nll"] is not None
    sft = next(m for m in result["models"] if m["role"] == "student")
    before = next(m for m in result["models"] if m["role"] == "before")
    assert sft["nll"] < before["nll"], f"two SFT steps already lower the NLL of the teacher's answers: {by_name}"
    report = (out / "eval" / "report.md").read_text()
    assert "gap" in report.lower() and list((out / "eval").glob("*.png"))
    assert "](../student-sft/training_curves.png)" in report, "the report shows the student's training loss"
    assert str(out / "eval") in first.stdout, "it ends by saying where things are"

    again = run(out, cache)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done already (unchanged): skipped") == 4, again.stdout
    assert "requests sent" not in again.stdout and "train_runtime" not in again.stdout, "no teacher call, no training step"

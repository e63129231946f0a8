"""Preference methods on a tiny Llama: the reward model learns the pairs, DPO's reward margin rises, outputs reload."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from distill.cli import main as distill_main
from tests.tiny_models import make_tiny_llama, write_preference_records
from trainers.dpo import train as train_dpo
from trainers.reward import train as train_reward
from trainers.settings import DPOSettings, RewardSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_preference_records(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 32)


def test_reward_model_pairwise_accuracy_rises_and_it_reloads_as_a_classifier(tiny, pairs, tmp_path):
    out = tmp_path / "rm"
    cfg = RewardSettings(model=str(tiny), data=pairs, output_dir=out, max_steps=30, learning_rate=1e-2, warmup_ratio=0, batch_size=16,
                         max_length=64, eval_fraction=0.25)
    metrics = train_reward(cfg).metrics
    # 8 held-out pairs: a random score head is near chance, the trained one must rank most pairs right.
    assert metrics["pairwise_accuracy_before"] <= 0.625, metrics
    assert metrics["pairwise_accuracy"] >= 0.75, metrics
    assert json.loads((out / "metrics.json").read_text())["final"]["pairwise_accuracy"] == metrics["pairwise_accuracy"]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None


def test_reward_model_with_lora_saves_a_plain_classifier(tiny, pairs, tmp_path):
    out = tmp_path / "rm-lora"
    train_reward(RewardSettings(model=str(tiny), data=pairs, output_dir=out, max_steps=2, batch_size=8, max_length=64, lora=True, lora_r=4))
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(str(out)).config.num_labels == 1


def test_dpo_reward_margin_rises_and_the_model_reloads(tiny, pairs, tmp_path):
    out = tmp_path / "dpo"
    cfg = DPOSettings(model=str(tiny), data=pairs, output_dir=out, max_steps=12, learning_rate=1e-3, batch_size=16, max_length=64)
    metrics = train_dpo(cfg).metrics
    # Step 1 is logged before any update, when the policy equals the reference: margin 0.
    assert metrics["rewards/margins_last"] > metrics["rewards/margins_first"], metrics
    assert metrics["rewards/margins_last"] > 0, metrics
    assert 0 <= metrics["rewards/accuracies_last"] <= 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 2


def test_dpo_cli_trains_and_prints_the_model_path(tiny, pairs, tmp_path):
    out = tmp_path / "dpo-cli"
    script = Path(sys.executable).with_name("distill")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "distill"]
    result = subprocess.run(
        [*command, "train", "dpo", "--model", str(tiny), "--data", str(pairs), "--output-dir", str(out), "--max-steps", "2",
         "--batch-size", "4", "--max-length", "64", "--loss-type", "ipo"],
        capture_output=True, text=True, env=dict(os.environ), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model: {out}" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "metrics.json").is_file()


@pytest.mark.parametrize("method", ["reward", "dpo"])
def test_a_preference_file_without_rejected_is_a_one_line_error(method, tiny, pairs, tmp_path, capsys):
    broken = tmp_path / "no-rejected.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()[:4]]
    broken.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "rejected"}) + "\n" for row in rows))
    code = distill_main(["train", method, "--model", str(tiny), "--data", str(broken), "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert str(broken) in err and "rejected" in err, err


def test_sft_records_name_the_missing_pair_columns(tiny, tmp_path, capsys):
    from tests.tiny_models import write_sft_records

    data = write_sft_records(tmp_path / "sft.jsonl", 4)
    code = distill_main(["train", "dpo", "--model", str(tiny), "--data", str(data), "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and str(data) in err and "missing: chosen, rejected" in err, err


def test_dpo_loss_types_are_exactly_trls():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    trl_values = set(re.findall(r"`'(\w+)'`", help_text))
    assert set(typing.get_args(DPOSettings.model_fields["loss_type"].annotation)) == trl_values
    with pytest.raises(ValidationError, match="loss_type"):
        DPOSettings(loss_type="kto")
    with pytest.raises(ValidationError, match="exo_pair needs label_smoothing"):
        DPOSettings(loss_type="exo_pair")


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_pairs_longer_than_max_length_stop_before_training(method, tiny, tmp_path, capsys):
    pairs = write_preference_records(tmp_path / "pairs.jsonl", 10)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for row in rows[:3]:  # 3 of 10: a rejected answer that runs on
        row["rejected"][0]["content"] = "The sky is blue. " * 30
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / method
    argv = ["train", method, "--model", str(tiny), "--data", str(pairs), "--output-dir", str(out), "--max-length", "64", "--max-steps", "1"]
    assert distill_main(argv) == 1
    err = capsys.readouterr().err
    assert str(pairs) in err and "3 of 10 pairs" in err and "--max-length to" in err, err
    assert not out.exists()
    assert distill_main([*argv, "--max-truncated", "0.3", "--batch-size", "2"]) == 0, "a share the user accepts trains"
    assert "pairs longer than max_length=64 tokens: 3 of 10" in capsys.readouterr().out

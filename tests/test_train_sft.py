"""SFT on a tiny Llama: the loss falls on a learnable toy set and the saved model reloads."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from synth.errors import InputError
from tests.tiny_models import (
    make_tiny_llama,
    write_preference_records,
    write_sft_records,
)
from trainers import METHODS
from trainers.settings import SFTSettings
from trainers.sft import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_sft_loss_falls_and_the_model_reloads(tiny, tmp_path):
    data = write_sft_records(tmp_path / "sft.jsonl", 16)
    out = tmp_path / "student"
    cfg = SFTSettings(model=str(tiny), data=data, output_dir=out, max_steps=30, learning_rate=3e-3, batch_size=8, max_length=64)
    result = train(cfg)
    losses = [row["loss"] for row in json.loads((out / "metrics.json").read_text())["history"] if "loss" in row]
    assert losses[-1] < 0.5 * losses[0], losses
    assert (out / "training_curves.png").stat().st_size > 1000
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 2
    assert result.metrics["train_loss"] > 0


def test_sft_with_lora_merges_into_a_plain_model(tiny, tmp_path):
    data = write_sft_records(tmp_path / "sft.jsonl", 8)
    out = tmp_path / "lora-student"
    train(SFTSettings(model=str(tiny), data=data, output_dir=out, max_steps=2, batch_size=4, max_length=64, lora=True, lora_r=4))
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_sft_refuses_preference_records(tiny, tmp_path):
    data = write_preference_records(tmp_path / "pairs.jsonl", 4)
    with pytest.raises(InputError, match="SFT needs 'messages' or 'prompt'/'completion' records"):
        train(SFTSettings(model=str(tiny), data=data, output_dir=tmp_path / "x"))


def test_training_on_the_cpu_flushes_denormal_floats(tmp_path):
    """Denormal gradients make x86 matrix kernels ~100x slower; a CPU run treats them as zero."""
    import torch

    from trainers.common import pick_device

    torch.set_flush_denormal(False)
    try:
        assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # this machine keeps denormals by default
        device, dtype, _ = pick_device(SFTSettings(model="m", data=tmp_path / "d.jsonl", device="cpu"))
        assert (device, dtype) == ("cpu", torch.float32)
        assert (torch.tensor([1e-39]) * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_each_method_in_the_table_is_a_trainer_module_whose_first_docstring_line_is_its_help():
    for name, method in METHODS.items():
        module = importlib.import_module(method.module)
        assert callable(module.train), name
        assert module.__doc__.strip().splitlines()[0] == method.summary, name


def test_building_the_cli_imports_no_trainer_and_no_torch():
    code = "import sys; from distill.cli import build_parser; build_parser(); print(sorted(m for m in sys.modules if m.startswith(('trainers', 'torch', 'trl'))))"
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "['trainers', 'trainers.settings']"

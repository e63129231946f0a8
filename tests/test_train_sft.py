"""SFT on a tiny Llama: the loss falls on a learnable toy set and the saved model reloads."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import main as distill_main
from synth.errors import InputError
from tests.tiny_models import (
    CHATML,
    make_tiny_llama,
    provenance,
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


# ---------------------------------------------------------------- what the loss learns


@pytest.fixture(scope="module")
def unmarked(tiny, tmp_path_factory):
    """The tiny model with a ChatML template without `{% generation %}` markers, as SmolLM2, Llama and Mistral ship theirs."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("unmarked") / "model"
    shutil.copytree(tiny, path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tok.save_pretrained(str(path))
    return path


def write_messages(path, chats: dict[str, list[tuple[str, str]]]):
    with path.open("w") as fh:
        for i, (rid, turns) in enumerate(chats.items()):
            messages = [{"role": role, "content": content} for role, content in turns]
            fh.write(json.dumps({"kind": "sft", "id": rid, "provenance": provenance(i), "messages": messages}) + "\n")
    return path


def learned_and_masked(trainer, tokenizer) -> dict[str, tuple[str, str]]:
    """For each prepared row, (the text of the tokens with a label, the text of those without), from the collator's batch."""
    rows = [dict(r) for r in trainer.train_dataset]
    batch = trainer.data_collator(rows)
    out = {}
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = attention.bool()
        learned = tokenizer.decode(ids[real & (labels != -100)])
        masked = tokenizer.decode(ids[real & (labels == -100)])
        out[learned] = (learned, masked)
    return out


def test_messages_records_learn_the_assistant_turns_only(unmarked, tmp_path):
    """System and user tokens get label -100 in the batches the trainer's collator builds; every assistant turn is learned."""
    from transformers import AutoTokenizer

    from trainers.sft import build_trainer

    data = write_messages(tmp_path / "chat.jsonl", {
        "one": [("system", "Answer with a color."), ("user", "What color is the sky?"), ("assistant", "The sky is blue.")],
        "two": [("user", "What color is the sun?"), ("assistant", "The sun is yellow."),
                ("user", "And the grass?"), ("assistant", "The grass is green.")],
    })  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(unmarked))
    trainer, _ = build_trainer(SFTSettings(model=str(unmarked), data=data, output_dir=tmp_path / "o", max_steps=1, max_length=128))
    rows = learned_and_masked(trainer, tok)
    assert set(rows) == {"The sky is blue.<|im_end|>\n", "The sun is yellow.<|im_end|>\nThe grass is green.<|im_end|>\n"}, rows
    _, masked = rows["The sky is blue.<|im_end|>\n"]
    assert masked == "<|im_start|>system\nAnswer with a color.<|im_end|>\n<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    _, masked = rows["The sun is yellow.<|im_end|>\nThe grass is green.<|im_end|>\n"]
    assert "What color is the sun?" in masked and "And the grass?" in masked

    # Switched off, every token is learned (TRL's own behaviour for messages).
    trainer, _ = build_trainer(SFTSettings(model=str(unmarked), data=data, output_dir=tmp_path / "o", max_steps=1, max_length=128,
                                           assistant_only_loss=False))  # fmt: skip
    assert all(masked == "" for _, masked in learned_and_masked(trainer, tok).values())


def test_a_template_that_renders_a_chat_s_start_differently_is_refused_by_record(tiny):
    from transformers import AutoTokenizer

    from trainers.chat_masks import assistant_mask

    tok = AutoTokenizer.from_pretrained(str(tiny))
    # Like templates that drop earlier turns' reasoning: the last message is rendered apart from the others.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}{% endfor %}"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    with pytest.raises(InputError, match="record r7: the chat template renders the chat up to turn 2 differently"):
        assistant_mask(tok, chat, "r7")


def test_prompt_completion_records_still_learn_the_completion_only(unmarked, tmp_path):
    from transformers import AutoTokenizer

    from trainers.sft import build_trainer

    data = write_sft_records(tmp_path / "sft.jsonl", 2)
    tok = AutoTokenizer.from_pretrained(str(unmarked))
    trainer, _ = build_trainer(SFTSettings(model=str(unmarked), data=data, output_dir=tmp_path / "o", max_steps=1, max_length=128))
    assert set(learned_and_masked(trainer, tok)) == {"The apple is red.<|im_end|>\n", "The sky is blue.<|im_end|>\n"}


# ---------------------------------------------------------------- truncation


def write_long_and_short(path, long: int, short: int):
    """SFT records: `long` whose answer runs past 64 tokens, `short` that fit."""
    with path.open("w") as fh:
        for i in range(long + short):
            answer = "The sky is blue. " * (20 if i < long else 1)
            fh.write(json.dumps({
                "kind": "sft", "id": f"r{i}", "provenance": provenance(i),
                "prompt": [{"role": "user", "content": "What color is the sky?"}],
                "completion": [{"role": "assistant", "content": answer.strip()}],
            }) + "\n")  # fmt: skip
    return path


def test_too_many_cut_examples_stop_before_training(tiny, tmp_path, capsys):
    data = write_long_and_short(tmp_path / "long.jsonl", long=6, short=14)
    out = tmp_path / "student"
    code = distill_main(["train", "sft", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--max-length", "64",
                         "--max-steps", "1"])  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert str(data) in err and "6 of 20 examples" in err and "--max-length" in err and "max_truncated=0.05" in err, err
    longest = int(err.split("the longest has ")[1].split(")")[0])
    assert longest > 64 and f"--max-length to {longest}" in err
    assert not out.exists(), "stopped before training"


def test_a_few_cut_examples_are_counted_and_training_goes_on(tiny, tmp_path, capsys):
    data = write_long_and_short(tmp_path / "long.jsonl", long=1, short=19)
    out = tmp_path / "student"
    code = distill_main(["train", "sft", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--max-length", "64",
                         "--max-steps", "1", "--batch-size", "2"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0 and (out / "config.json").is_file()
    assert "examples longer than max_length=64 tokens: 1 of 20, cut" in stdout, stdout

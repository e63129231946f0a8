"""Derived students: keeping every layer reproduces the source exactly; keeping half halves the depth."""

from __future__ import annotations

import json
import time

import pytest

from synth.errors import ConfigError
from tests.tiny_models import make_tiny_llama, make_tokenizer
from trainers.student import DERIVED_FROM, derive_student, layers_to_keep


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """A 4-layer tiny Llama."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0, layers=4)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


IDS = [5, 17, 42, 99, 7, 3, 64, 120, 11]


def test_layers_to_keep_is_evenly_spaced_with_first_and_last():
    assert layers_to_keep(30, 0.5) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert layers_to_keep(30, 1.0) == list(range(30))
    assert layers_to_keep(30, 30) == list(range(30))
    assert layers_to_keep(4, 0.5) == [0, 3]
    assert layers_to_keep(6, 3) == [0, 3, 5]
    assert layers_to_keep(10, 0.01) == [0, 9]  # never fewer than first + last
    for n in range(2, 40):
        for k in range(2, n + 1):
            kept = layers_to_keep(n, k)
            assert len(set(kept)) == k and kept[0] == 0 and kept[-1] == n - 1 and kept == sorted(kept)
    for bad in (0, 1, 31, 1.5, 0.0, -0.5, True):
        with pytest.raises(ConfigError):
            layers_to_keep(30, bad)


def test_keeping_every_layer_reproduces_the_logits_exactly(tiny4, tmp_path):
    import torch

    out = derive_student(tiny4, 1.0, tmp_path / "all")
    source, student = load(tiny4), load(out)
    assert student.config.num_hidden_layers == 4
    assert torch.equal(logits(source, IDS), logits(student, IDS))
    info = json.loads((out / DERIVED_FROM).read_text())
    assert info["kept_layers"] == [0, 1, 2, 3] and info["source_layers"] == 4
    # The tokenizer and generation config come along.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    assert (out / "generation_config.json").is_file()


def test_keeping_half_halves_the_layers_and_copies_first_and_last(tiny4, tmp_path):
    import torch

    out = derive_student(tiny4, 0.5, tmp_path / "half")
    source, student = load(tiny4), load(out)
    assert student.config.num_hidden_layers == 2
    assert len(student.model.layers) == 2
    src, dst = source.state_dict(), student.state_dict()
    for new, old in ((0, 0), (1, 3)):
        for name, tensor in src.items():
            prefix = f"model.layers.{old}."
            if name.startswith(prefix):
                assert torch.equal(dst[f"model.layers.{new}." + name[len(prefix):]], tensor), name
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(dst[name], src[name])
    assert json.loads((out / DERIVED_FROM).read_text())["kept_layers"] == [0, 3]
    # Layer indices were renumbered: generating with the KV cache agrees with generating without it.
    ids = torch.tensor([IDS])
    with torch.inference_mode():
        cached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_per_layer_config_lists_follow_the_kept_layers(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    source = tmp_path / "qwen"
    tok = make_tokenizer(source)
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, layer_types=types, sliding_window=4, use_sliding_window=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(source))
    same = derive_student(source, 4, tmp_path / "all")
    assert torch.equal(logits(load(source), IDS), logits(load(same), IDS))
    three = load(derive_student(source, 3, tmp_path / "three"))
    assert three.config.layer_types == [types[0], types[2], types[3]]  # layers 0, 2, 3
    assert torch.isfinite(logits(three, IDS)).all()


def test_other_architectures_and_bad_outputs_are_refused(tiny4, tmp_path):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100).save_pretrained(str(gpt2))
    with pytest.raises(ConfigError, match="model type 'gpt2' is not supported.*llama"):
        derive_student(gpt2, 0.5, tmp_path / "x")
    with pytest.raises(ConfigError, match="would overwrite its source"):
        derive_student(tiny4, 0.5, tiny4)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        derive_student(tiny4, 0.5, full)
    with pytest.raises(ConfigError, match="no Hugging Face model directory"):
        derive_student(tmp_path / "nowhere", 0.5, tmp_path / "y")


def test_derive_from_the_embedded_model_on_the_command_line(tmp_path, capsys):
    from distill.cli import main

    out = tmp_path / "smol-half"
    start = time.monotonic()
    assert main(["student", "derive", "--from", "embedded", "--keep", "0.5", "--out", str(out)]) == 0
    seconds = time.monotonic() - start
    assert "15 of 30 layers" in capsys.readouterr().out
    model = load(out)
    assert model.config.num_hidden_layers == 15 and len(model.model.layers) == 15
    assert json.loads((out / DERIVED_FROM).read_text())["source"] == "embedded"
    assert seconds < 60, seconds  # ~5 s on an idle 2-core machine; generous for a busy one
    assert main(["student", "derive", "--keep", "0.5", "--out", str(out)]) == 1  # not empty: a one-line error

"""Tiny real models for trainer tests: a BPE tokenizer trained offline and a 2-layer Llama built from a config."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["apple", "sky", "grass", "sun", "coal", "snow", "grape", "carrot"]


def corpus() -> list[str]:
    """Text the tokenizer is trained on: the toy tasks' words and some filler."""
    lines = [f"What color is the {t}? The {t} is {c}." for t, c in zip(THINGS, COLORS)]
    lines += ["user assistant system answer question good bad better worse reward score"] * 4
    lines += [" ".join(str(i) for i in range(100))]
    return lines


def make_tokenizer(directory: Path):
    """A byte-level BPE tokenizer (vocab ~400) with ChatML specials, trained here, saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(directory))
    return fast


def make_tiny_llama(directory: Path, seed: int = 0, layers: int = 2) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) with the tokenizer above, saved to `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def provenance(i: int) -> dict:
    return {"teacher": "test", "method": "test", "task": f"t{i}"}


def write_sft_records(path: Path, count: int = 16) -> Path:
    """Prompt/completion records of a learnable toy task (each thing has one color)."""
    with path.open("w") as fh:
        for i in range(count):
            t, c = THINGS[i % len(THINGS)], COLORS[i % len(COLORS)]
            fh.write(json.dumps({
                "kind": "sft", "id": f"s{i}", "provenance": provenance(i),
                "prompt": [{"role": "user", "content": f"What color is the {t}?"}],
                "completion": [{"role": "assistant", "content": f"The {t} is {c}."}],
            }) + "\n")
    return path


def write_preference_records(path: Path, count: int = 16) -> Path:
    """Preference pairs where the chosen answer names the right color and the rejected one a wrong one."""
    with path.open("w") as fh:
        for i in range(count):
            t, c = THINGS[i % len(THINGS)], COLORS[i % len(COLORS)]
            wrong = COLORS[(i + 3) % len(COLORS)]
            fh.write(json.dumps({
                "kind": "preference", "id": f"p{i}", "provenance": provenance(i),
                "prompt": [{"role": "user", "content": f"What color is the {t}?"}],
                "chosen": [{"role": "assistant", "content": f"The {t} is {c}."}],
                "rejected": [{"role": "assistant", "content": f"The {t} is {wrong}."}],
                "score_chosen": 9, "score_rejected": 2,
            }) + "\n")
    return path

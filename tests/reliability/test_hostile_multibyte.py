"""Text cut at --max-tokens inside a multi-byte character (Chinese, emoji).

A byte-level tokenizer spells 中 as three byte tokens; a cut after the first one or two used
to save the answer with U+FFFD, and KD then refused every such row with a message about the
student's tokenizer. A scripted tiny Llama (its greedy answer to any prompt is a fixed token
sequence) makes the cut land where the test wants it, in a second.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from synth.errors import InputError
from synth.teachers.base import ChatRequest, SamplingParams
from synth.records import Message
from synth.teachers.config import TeacherSettings
from synth.teachers.local import TransformersTeacher
from tests.tiny_models import make_tiny_llama

ANSWER = "x中"  # "x", then 中's three UTF-8 bytes, each its own token in the tiny vocabulary


def scripted_llama(directory: Path, answer: str) -> Path:
    """A tiny Llama whose greedy answer to any chat prompt is `answer`, then its end token.

    The layers are silenced (each position sees only its own token), each token of the script
    embeds as its own one-hot state, and the head maps state i to token i + 1.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_llama(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True)
    chain = [prompt["input_ids"][-1], *tok(answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(set(chain)) == len(chain), "each token of the script must be distinct"
    model = AutoModelForCausalLM.from_pretrained(str(directory))
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        vocab, hidden = model.model.embed_tokens.weight.shape
        emb, head = torch.zeros(vocab, hidden), torch.zeros(vocab, hidden)
        for state, (token, following) in enumerate(zip(chain, chain[1:])):
            emb[token, state], head[following, state] = 1.0, 10.0
        model.model.embed_tokens.weight = torch.nn.Parameter(emb)
        model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """The scripted model's directory and a CPU teacher on it."""
    path = scripted_llama(tmp_path_factory.mktemp("scripted") / "model", ANSWER)
    teacher = TransformersTeacher(TeacherSettings(model=str(path), device="cpu"))
    yield path, teacher
    asyncio.run(teacher.aclose())


def answer(teacher: TransformersTeacher, max_tokens: int):
    """The teacher's greedy completion of one prompt, with top-2 logprobs."""
    req = ChatRequest(messages=[Message(role="user", content="hi")], params=SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2))
    (resp,) = asyncio.run(teacher.generate([req]))
    return resp.completions[0]


@pytest.mark.parametrize("max_tokens, text", [(2, "x"), (3, "x"), (4, "x中")], ids=["cut-after-1-of-3-bytes", "cut-after-2-of-3-bytes", "whole"])
def test_a_cut_inside_a_character_keeps_whole_characters_and_matching_logprobs(scripted, max_tokens, text):
    teacher = scripted[1]
    c = answer(teacher, max_tokens)
    assert (c.text, c.finish_reason) == (text, "length")
    # Soft labels and the token count describe exactly the tokens that spell the text.
    ids = [lp.id for lp in c.logprobs]
    assert teacher._tokenizer.decode(ids) == c.text and c.completion_tokens == len(ids)


def labeled_then_kd(model: Path, tmp_path: Path, edit=None):
    """`distill generate --logprobs` on the scripted teacher, cut inside 中; then KD's data preparation on its records."""
    from distill.cli import main
    from trainers.kd import build_trainer
    from trainers.settings import KDSettings

    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    out = tmp_path / "soft.jsonl"
    args = ["generate", "--teacher", f"hf:{model}", "--input", str(prompts), "--output", str(out),
            "--max-tokens", "3", "--logprobs", "2", "--temperature", "0", "--keep-truncated", "--quiet", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(args) == 0
    if edit:
        record = json.loads(out.read_text())
        edit(record)
        out.write_text(json.dumps(record) + "\n")
    settings = KDSettings(model=str(model), data=out, output_dir=tmp_path / "kd", max_steps=1, batch_size=1, max_length=64)
    trainer, _, _ = build_trainer(settings)
    return trainer


def test_kd_uses_the_rows_of_an_answer_cut_inside_a_character(scripted, tmp_path):
    trainer = labeled_then_kd(scripted[0], tmp_path)
    (row,) = list(trainer.train_dataset)
    assert len(row["kd_ids"]) == 1, "the soft label of the kept token 'x'"


def test_kd_names_the_cut_character_not_the_tokenizer_for_rows_saved_with_u_fffd(scripted, tmp_path):
    """Records an older version (or an HTTP server) wrote: the text ends in U+FFFD, the tokens are the cut bytes."""
    def as_saved_before(record):
        tok = scripted[1]._tokenizer
        cut = tok("中", add_special_tokens=False)["input_ids"][:2]
        soft = record["soft_labels"]
        soft["token_ids"] = soft["token_ids"] + cut
        soft["tokens"] = soft["tokens"] + [tok.decode([i]) for i in cut]
        soft["top_ids"] = soft["top_ids"] + [[i, i] for i in cut]
        soft["top_logprobs"] = soft["top_logprobs"] + [[0.0, -80.0]] * 2
        reply = record["messages"][-1] if "messages" in record else record["completion"][0]
        reply["content"] += "\ufffd"

    with pytest.raises(InputError) as err:
        labeled_then_kd(scripted[0], tmp_path, as_saved_before)
    message = str(err.value)
    assert "cut inside a multi-byte character" in message and "--refresh" in message and "Is the student's tokenizer" not in message, message

"""The transformers teacher on tiny local models: greedy means greedy whatever the checkpoint's
generation_config says, logprobs are computed step by step, and a `<think>` block is split off."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from synth.records import Message
from synth.teachers.base import ChatRequest, ChatResponse, SamplingParams
from synth.teachers.config import parse_teacher_spec
from synth.teachers.local import (
    TransformersTeacher,
    _LogprobRecorder,
    _neutral_generation_config,
    _Row,
    _RowSampler,
)
from synth.teachers.reasoning import spelled_by, split_generated
from tests.tiny_models import make_tiny_llama, make_tokenizer

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread when the suite runs in parallel (see ENVIRONMENT.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ask(question: str, **params) -> ChatRequest:
    """A one-turn chat request."""
    return ChatRequest(messages=[Message(role="user", content=question)], params=SamplingParams(**params))


def load(directory: Path) -> TransformersTeacher:
    """A teacher on a local model directory, loaded."""
    teacher = TransformersTeacher(parse_teacher_spec(f"hf:{directory}"))
    asyncio.run(teacher.generate([]))
    return teacher


# --- the checkpoint's generation_config changes nothing ----------------------


@pytest.fixture(scope="module")
def opinionated(tmp_path_factory):
    """A tiny Llama whose generation_config.json asks for sampling, penalties and n-gram bans."""
    directory = make_tiny_llama(tmp_path_factory.mktemp("opinionated"))
    config = json.loads((directory / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.3, top_k=3, top_p=0.5, repetition_penalty=5.0, no_repeat_ngram_size=2, min_new_tokens=4, num_beams=2)
    (directory / "generation_config.json").write_text(json.dumps(config))
    teacher = load(directory)
    yield teacher
    asyncio.run(teacher.aclose())


def test_greedy_ignores_the_checkpoints_generation_config(opinionated):
    """Temperature 0 is the argmax of the raw logits, and each logprob is their log_softmax at that step."""
    request = ask("What color is the sky?", temperature=0, max_tokens=16, logprobs=3)
    [res] = asyncio.run(opinionated.generate([request]))
    assert isinstance(res, ChatResponse), res
    [c] = res.completions
    emitted = [lp.id for lp in c.logprobs]
    assert len(emitted) == c.completion_tokens == 16
    prompt = opinionated._encode(request)
    with torch.inference_mode():
        logits = opinionated._model(torch.tensor([prompt + emitted])).logits[0, len(prompt) - 1 : -1]
    raw = torch.log_softmax(logits.float(), dim=-1)
    # This tiny model's argmax repeats the last token: a repetition penalty of 5 would forbid it.
    assert emitted == raw.argmax(-1).tolist()
    assert [lp.logprob for lp in c.logprobs] == pytest.approx(raw.gather(1, torch.tensor(emitted)[:, None])[:, 0].tolist(), abs=1e-4)
    assert all(lp.top[0].id == lp.id for lp in c.logprobs)


# --- logprobs step by step equal logprobs from all of generate()'s logits ---------


def old_logprobs(out, generated, k: int) -> tuple[list, list, list]:
    """The computation the recorder replaced: a float32 log_softmax of every step of `output_logits`."""
    steps = [torch.log_softmax(step.float(), dim=-1) for step in out.logits]
    chosen = torch.stack([lp.gather(1, generated[:, t : t + 1])[:, 0] for t, lp in enumerate(steps)], 1).tolist()
    tops = [lp.topk(k, dim=-1) for lp in steps]
    return chosen, torch.stack([t.indices for t in tops], 1).tolist(), torch.stack([t.values for t in tops], 1).tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The plain tiny Llama of tests/tiny_models.py, loaded as a teacher."""
    teacher = load(make_tiny_llama(tmp_path_factory.mktemp("tiny")))
    yield teacher
    asyncio.run(teacher.aclose())


def test_recorded_logprobs_equal_the_full_logits_computation(tiny):
    """Padding, sampled and greedy rows, rows ending at different steps: the recorder matches output_logits exactly."""
    questions = ["What color is the sky?", "Hi", "What color is the grass? The grass is green.", "good bad"]
    rows = [
        _Row(i, 0, tiny._encode(ask(q)), SamplingParams(temperature=0 if i == 3 else 1.0), seed=i)
        for i, q in enumerate(questions)
    ]

    def generate(eos: list[int], k: int = 4):
        width = max(len(r.prompt) for r in rows)
        pad = tiny._tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in rows])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r.prompt) for r in rows])[:, None]).long()
        recorder = _LogprobRecorder(k, len(rows), 10)
        config = _neutral_generation_config(max_new_tokens=10, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
                                            return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            out = tiny._model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                       logits_processor=[recorder, _RowSampler(rows, "cpu")])
        generated = out.sequences[:, width:]
        return generated, recorder.finish(generated), old_logprobs(out, generated, k)

    free, _, _ = generate([tiny._tokenizer.eos_token_id])
    # End generation at a token the first sampled row draws early, so rows stop at different steps.
    eos = free[0, 2].item()
    generated, new, old = generate([eos])
    ends = [row.index(eos) if eos in row else len(row) for row in generated.tolist()]
    assert len(set(ends)) > 1 and generated.shape[1] > min(ends) + 1, ends
    assert new[0] == old[0] and new[1] == old[1] and new[2] == old[2]
    assert len(new[0][0]) == generated.shape[1]


def test_teacher_logprobs_with_padding_and_sampling(tiny):
    """Through the teacher: one logprob per emitted token, the top-k sorted, the sampled token's own value."""
    requests = [ask("What color is the sky?", temperature=1.0, seed=3, max_tokens=6, logprobs=2), ask("Hi", temperature=0, max_tokens=6, logprobs=2)]
    for res in asyncio.run(tiny.generate(requests)):
        [c] = res.completions
        assert len(c.logprobs) == c.completion_tokens > 0 and c.reasoning is None
        for lp in c.logprobs:
            assert len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob >= -20 and lp.logprob <= lp.top[0].logprob + 1e-6


def test_logprobs_do_not_keep_every_steps_logits(tiny, monkeypatch):
    """generate() is not asked for output_logits, which would hold (steps, batch, vocab) floats to the end."""
    model = tiny._model
    real = model.generate
    seen = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.logits)
        return out

    monkeypatch.setattr(model, "generate", spy)
    [res] = asyncio.run(tiny.generate([ask("Hi", temperature=0, max_tokens=5, logprobs=3)]))
    assert seen == [None] and len(res.completions[0].logprobs) == 5


# --- <think> blocks ----------------------------------------------------------


def test_split_generated_counts_the_thinking_tokens():
    pieces = ["<think>", "a", " b", "</think>", "\n\n", "The", " end"]
    text = "".join(pieces)
    assert split_generated(text, 7, spelled_by(pieces)) == ("a b", "The end", 5, True)
    # R1-style: the prompt opened the block, the text only closes it.
    assert split_generated("a b</think>\n\nok", 5, spelled_by(["a", " b", "</think>", "\n\n", "ok"])) == ("a b", "ok", 4, True)
    # Cut off while thinking: every token is reasoning, the answer is empty.
    assert split_generated("<think>still", 3, spelled_by(["<think>", "st", "ill"])) == ("still", "", 3, True)
    # No tags: all answer, nothing counted (the tokens are not even looked at).
    assert split_generated("Hello", 2, None) == (None, "Hello", 0, True)


def test_split_generated_refuses_to_misalign():
    """A token spanning the gap and the answer's first word: counted, but not aligned (logprobs get dropped)."""
    pieces = ["<think>", "a", "</think>", " The", " end"]
    assert split_generated("".join(pieces), 5, spelled_by(pieces)) == ("a", "The end", 4, False)
    # Pieces that do not spell the text (a byte token decoded alone) never pass for aligned.
    assert split_generated("<think>é</think>ok", 5, spelled_by(["<think>", "\ufffd", "\ufffd", "</think>", "ok"]))[3] is False
    assert split_generated("<think>a</think>ok", 3, None) == ("a", "ok", 0, False)


def make_thinker(directory: Path) -> list[int]:
    """A 1-layer Llama that always writes `<think>sky apple</think>The grass is green.` then its end token.

    Attention and MLP outputs are zero, so the last hidden state is the current token's embedding;
    the untied head maps each script token's (normalised) embedding to the next script token.
    Returns the script's token ids.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(directory)
    tok.add_tokens(["<think>", "</think>"])  # plain added tokens, as in Qwen3 / DeepSeek-R1: decoded text keeps them
    tok.save_pretrained(str(directory))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    script = tok("<think>sky apple</think>The grass is green.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    last_prompt_token = tok("\n", add_special_tokens=False)["input_ids"][-1]  # the template ends "assistant\n"
    chain = [last_prompt_token, *script]
    assert len(set(chain)) == len(chain), "each script token must have one successor"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        hidden = model.model.norm(emb)  # what the head sees after a token
        model.lm_head.weight.zero_()
        for current, following in zip(chain, chain[1:]):
            model.lm_head.weight[following] += 30 * hidden[current] / hidden[current].pow(2).sum()
    model.save_pretrained(str(directory))
    return script


def test_local_generation_splits_a_think_block(tmp_path):
    script = make_thinker(tmp_path)
    teacher = load(tmp_path)
    close = teacher._tokenizer.convert_tokens_to_ids("</think>")
    try:
        [res] = asyncio.run(teacher.generate([ask("Why?", temperature=0, max_tokens=30, logprobs=2)]))
    finally:
        asyncio.run(teacher.aclose())
    [c] = res.completions
    assert (c.reasoning, c.text, c.finish_reason) == ("sky apple", "The grass is green.", "stop")
    thinking = script.index(close) + 1
    assert (c.completion_tokens, c.reasoning_tokens) == (len(script) - 1, thinking)  # the end token is not counted
    assert res.usage.reasoning_tokens == thinking and teacher.stats.reasoning_tokens == thinking
    # Logprobs cover the answer's tokens only, and spell it.
    assert [lp.id for lp in c.logprobs] == script[thinking:-1]
    assert "".join(lp.token for lp in c.logprobs) == c.text


# --- a row's answer does not depend on its batch mates --------------------------


def test_batched_left_padded_rows_equal_each_row_alone(tmp_path):
    """Prompts of very different lengths share a left-padded batch: each gets the text and logprobs it gets alone."""
    teacher = load(make_tiny_llama(tmp_path / "tiny"))
    questions = ["Hi", "Tell me, in a few words, why the sky looks blue on a clear afternoon in summer.", "2+2?"]
    requests = [ask(q, temperature=0, max_tokens=12, logprobs=2) for q in questions]
    requests.append(ask(questions[0], temperature=0.9, seed=5, max_tokens=12, logprobs=2))  # a seeded sample too
    together = asyncio.run(teacher.generate(requests))
    teacher.batch_size = 1
    alone = [asyncio.run(teacher.generate([r]))[0] for r in requests]
    assert len({len(teacher._encode(r)) for r in requests}) > 2, "the batch really needs padding"
    for a, b in zip(together, alone):
        (x,), (y,) = a.completions, b.completions
        assert x.text == y.text and [t.id for t in x.logprobs] == [t.id for t in y.logprobs]
        assert [t.logprob for t in x.logprobs] == pytest.approx([t.logprob for t in y.logprobs], abs=1e-4)
        assert [[c.id for c in t.top] for t in x.logprobs] == [[c.id for c in t.top] for t in y.logprobs]
    asyncio.run(teacher.aclose())

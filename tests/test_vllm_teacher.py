"""The vLLM teacher: the missing-extra error, and the pure translation to and from vLLM's types."""

from __future__ import annotations

import asyncio
import os
import sys
from types import SimpleNamespace

import pytest

from synth.errors import ConfigError
from synth.records import Message
from synth.teachers import (
    ChatRequest,
    ChatResponse,
    PermanentTeacherError,
    SamplingParams,
    TeacherSettings,
    build_teacher,
)
from synth.teachers.vllm_engine import (
    convert_logprobs,
    engine_kwargs,
    resolve_json_field,
    sampling_kwargs,
    to_chat_response,
)


def lp(logprob, rank=None, text=None):
    """A vLLM-shaped Logprob."""
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def structured(**kw):
    """Stands in for StructuredOutputsParams: records what it was built with."""
    return ("SO", kw)


# --- building the teacher -------------------------------------------------


def test_missing_vllm_is_a_one_line_config_error(monkeypatch):
    # None in sys.modules makes `import vllm` fail even where vllm is installed.
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError) as info:
        build_teacher(TeacherSettings(backend="vllm", model="x"))
    message = str(info.value)
    assert "pip install 'blackbox-distill[vllm]'" in message
    assert "\n" not in message


def test_engine_kwargs_merge_engine_args():
    cfg = TeacherSettings(backend="vllm", model="m", dtype="bfloat16", trust_remote_code=True,
                        engine_args={"gpu_memory_utilization": 0.5, "seed": 7})
    assert engine_kwargs(cfg) == {
        "model": "m", "dtype": "bfloat16", "trust_remote_code": True, "seed": 7, "gpu_memory_utilization": 0.5,
    }
    assert engine_kwargs(TeacherSettings(backend="vllm", model="m"))["seed"] == 0
    with pytest.raises(ConfigError):
        engine_kwargs(TeacherSettings(backend="vllm", model="m", engine_args={"model": "other"}))


# --- our SamplingParams -> vLLM keyword arguments -------------------------


def _req(params: SamplingParams, offset: int = 0, text: str = "hi") -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=text)], params=params, sample_offset=offset)


def test_sampling_kwargs_minimal():
    assert sampling_kwargs(_req(SamplingParams())) == {"n": 1, "temperature": 0.7, "top_p": 1.0, "max_tokens": 512}


def test_sampling_kwargs_full():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = SamplingParams(temperature=0.0, top_p=0.9, max_tokens=64, n=3, seed=100,
                            stop=["\n\n"], logprobs=5, json_schema=schema)
    req = _req(params, offset=4)
    kw = sampling_kwargs(req, json_field=("structured_outputs", structured))
    assert kw == {
        "n": 3, "temperature": 0.0, "top_p": 0.9, "max_tokens": 64,
        "seed": req.sample_seed(4),  # seed of sample 4; vLLM gives child i seed + i, as sample_seed does
        "stop": ["\n\n"], "logprobs": 5,
        "structured_outputs": ("SO", {"json": schema}),
    }


def test_sampling_kwargs_logprobs_zero_is_kept():
    assert sampling_kwargs(_req(SamplingParams(logprobs=0)))["logprobs"] == 0


def test_sample_seeds_are_per_request_and_consecutive():
    """Two prompts with one base seed draw from different streams; a request's samples are base + i."""
    a, b = _req(SamplingParams(seed=0), text="a"), _req(SamplingParams(seed=0), text="b")
    assert a.sample_seed(0) != b.sample_seed(0)
    assert abs(a.sample_seed(0) - b.sample_seed(0)) > 1000  # not neighbouring streams either
    assert a.sample_seed(3) == a.sample_seed(0) + 3
    assert _req(SamplingParams(seed=1), text="a").sample_seed(0) != a.sample_seed(0)
    assert _req(SamplingParams(), text="a").sample_seed(0) is None
    assert 0 <= a.sample_seed(0) < 2**31


def test_json_schema_without_structured_support_fails_the_request():
    with pytest.raises(PermanentTeacherError):
        sampling_kwargs(_req(SamplingParams(json_schema={"type": "object"})), json_field=None)


def test_resolve_json_field_prefers_structured_outputs():
    new = SimpleNamespace(StructuredOutputsParams=structured, GuidedDecodingParams=object)
    old = SimpleNamespace(GuidedDecodingParams=structured)
    assert resolve_json_field(new) == ("structured_outputs", structured)
    assert resolve_json_field(old) == ("guided_decoding", structured)
    assert resolve_json_field(SimpleNamespace()) is None


# --- vLLM outputs -> ChatResponse -----------------------------------------


def test_convert_logprobs_sorts_and_keeps_k():
    # Position 0: sampled token 7 is outside the top 2, so vLLM sent k+1 entries.
    positions = [
        {7: lp(-3.0, 3, " c"), 5: lp(-0.5, 1, " a"), 6: lp(-1.0, 2, " b")},
        {9: lp(-0.1, 1, "!"), 8: lp(-2.5, 2, "?")},
    ]
    out = convert_logprobs([7, 9], positions, k=2)
    assert [(t.token, t.id, t.logprob) for t in out] == [(" c", 7, -3.0), ("!", 9, -0.1)]
    assert [(c.token, c.id, c.logprob) for c in out[0].top] == [(" a", 5, -0.5), (" b", 6, -1.0)]
    assert [c.id for c in out[1].top] == [9, 8]


def test_convert_logprobs_zero_k_has_empty_top():
    out = convert_logprobs([3], [{3: lp(-0.2, 1, "x")}], k=0)
    assert out[0].top == [] and out[0].logprob == -0.2


def test_convert_logprobs_missing_sampled_token_is_an_error():
    with pytest.raises(ValueError):
        convert_logprobs([3], [{4: lp(-0.2)}], k=1)


def test_to_chat_response_orders_samples_and_counts_tokens():
    output = SimpleNamespace(
        prompt_token_ids=[1, 2, 3, 4],
        outputs=[
            SimpleNamespace(index=1, text="second", token_ids=[10, 11, 12], finish_reason="length",
                            logprobs=[{10: lp(-0.1)}, {11: lp(-0.2)}, {12: lp(-0.3)}]),
            SimpleNamespace(index=0, text="first", token_ids=(20,), finish_reason="stop",
                            logprobs=[{20: lp(-1.5, 2, "f"), 21: lp(-0.4, 1, "g")}]),
        ],
    )
    resp = to_chat_response(output, SamplingParams(n=2, logprobs=1), "teacher")
    assert isinstance(resp, ChatResponse)
    assert [c.text for c in resp.completions] == ["first", "second"]
    assert [c.finish_reason for c in resp.completions] == ["stop", "length"]
    assert [c.completion_tokens for c in resp.completions] == [1, 3]
    assert resp.usage.prompt_tokens == 4 and resp.usage.completion_tokens == 4
    assert resp.model == "teacher"
    first = resp.completions[0].logprobs[0]
    assert (first.token, first.id, first.logprob) == ("f", 20, -1.5)
    assert [(c.id, c.logprob) for c in first.top] == [(21, -0.4)]


def test_to_chat_response_without_logprobs():
    output = SimpleNamespace(prompt_token_ids=None, outputs=[
        SimpleNamespace(index=0, text="hi", token_ids=[1], finish_reason="stop", logprobs=None),
    ])
    resp = to_chat_response(output, SamplingParams(), "m")
    assert resp.completions[0].logprobs is None and resp.usage.prompt_tokens == 0


def test_to_chat_response_rejects_wrong_sample_count():
    output = SimpleNamespace(prompt_token_ids=[1], outputs=[
        SimpleNamespace(index=0, text="a", token_ids=[1], finish_reason="stop", logprobs=None),
    ])
    with pytest.raises(ValueError):
        to_chat_response(output, SamplingParams(n=2), "m")


# --- the teacher around a fake engine ------------------------------------


class FakeLLM:
    """Answers like vllm.LLM; a conversation saying "boom" fails the whole call, as vLLM's validation does.

    Each answer's text is `<last message>#<its seed>`. With a seed, vLLM seeds parallel sample i of a
    request with seed + i (vLLM's ParentRequest gives child i `seed + i`), so an n=2 request's samples
    differ; without one the seed is None.
    """

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []

    def chat(self, conversations, sampling_params, use_tqdm=True):
        self.calls.append(len(conversations))
        assert isinstance(sampling_params, list) and len(sampling_params) == len(conversations)
        if any(m["content"] == "boom" for conv in conversations for m in conv):
            raise ValueError("prompt too long\nsecond line")
        return [
            SimpleNamespace(prompt_token_ids=[0] * len(conv), outputs=[
                SimpleNamespace(index=i, text=f"{conv[-1]['content']}#{_child_seed(sp.kw.get('seed'), i)}", token_ids=[1, 2],
                                finish_reason="stop", logprobs=None)
                for i in range(sp.kw["n"])
            ])
            for conv, sp in zip(conversations, sampling_params)
        ]


def _child_seed(seed, i):
    """The seed vLLM gives parallel sample i of a request seeded `seed`: seed + i (None stays None)."""
    return None if seed is None else seed + i


@pytest.fixture
def fake_vllm(monkeypatch):
    import types

    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = structured
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: SimpleNamespace(kw=kw)
    fake.sampling_params = sampling
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return fake


def ask(text, **params):
    return ChatRequest(messages=[Message(role="user", content=text)], params=SamplingParams(**params))


def test_teacher_batches_and_isolates_failures(fake_vllm):
    teacher = build_teacher(TeacherSettings(backend="vllm", model="m", engine_args={"tokenizer": "tok"}))
    assert (teacher.backend, teacher.batch_size, teacher.concurrency, teacher.tokenizer_name) == ("vllm", 256, 1, "tok")
    assert teacher._llm.kwargs["model"] == "m"
    caps = asyncio.run(teacher.capabilities())
    assert caps.n and caps.logprobs and caps.json_schema == "json_schema"

    requests = [ask("a", n=2, seed=10), ask("boom"), ask("c", json_schema={"type": "object"})]
    requests[0] = requests[0].model_copy(update={"sample_offset": 3})
    results = asyncio.run(teacher.generate(requests))
    assert teacher._llm.calls == [3, 1, 1, 1]  # the batch, then one by one after it failed
    first = requests[0].sample_seed(3)  # the seed of sample 3 of that request
    assert [c.text for c in results[0].completions] == [f"a#{first}", f"a#{first + 1}"], "sample i is seeded seed + i, as in vLLM"
    assert isinstance(results[1], PermanentTeacherError) and "\n" not in results[1].message
    assert results[2].completions[0].text == "c#None"
    assert (teacher.stats.requests_sent, teacher.stats.requests_ok, teacher.stats.errors) == (3, 2, 1)

    ok = asyncio.run(teacher.generate([ask("x"), ask("y")]))
    assert teacher._llm.calls[-1] == 2 and all(isinstance(r, ChatResponse) for r in ok)
    asyncio.run(teacher.aclose())
    assert isinstance(asyncio.run(teacher.generate([ask("z")]))[0], PermanentTeacherError)


def test_teacher_load_failure_is_a_config_error(fake_vllm, monkeypatch):
    def broken(**kwargs):
        raise OSError("no such model\ntraceback noise")

    monkeypatch.setattr(fake_vllm, "LLM", broken)
    with pytest.raises(ConfigError, match="could not load 'm'") as info:
        build_teacher(TeacherSettings(backend="vllm", model="m"))
    assert "\n" not in str(info.value)


# --- a real engine, on a GPU machine only ----------------------------------


@pytest.mark.gpu
def test_real_vllm_generation():
    pytest.importorskip("vllm")
    model = os.environ.get("BBD_VLLM_TEST_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    if not os.path.isdir(model):
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(model, local_files_only=True)
        except Exception:
            pytest.skip(f"{model} is not in the local Hugging Face cache (set BBD_VLLM_TEST_MODEL to a local path)")
    teacher = build_teacher(TeacherSettings(backend="vllm", model=model,
                                          engine_args={"gpu_memory_utilization": 0.3, "max_model_len": 1024}))
    params = SamplingParams(temperature=0.8, max_tokens=16, n=2, seed=1, logprobs=3)
    request = ChatRequest(messages=[Message(role="user", content="What is the capital of France?")], params=params)
    too_long = ChatRequest(messages=[Message(role="user", content="word " * 5000)], params=params)
    try:
        first, bad = asyncio.run(teacher.generate([request, too_long]))
        assert isinstance(first, ChatResponse) and len(first.completions) == 2
        assert isinstance(bad, PermanentTeacherError)
        assert first.usage.prompt_tokens > 0
        for c in first.completions:
            assert 0 < c.completion_tokens <= 16 and len(c.logprobs) == c.completion_tokens
            assert all(len(t.top) == 3 for t in c.logprobs)
        # Resuming at sample 1 reproduces sample 1.
        again = asyncio.run(teacher.generate([request.model_copy(update={
            "params": params.model_copy(update={"n": 1}), "sample_offset": 1})]))[0]
        assert again.completions[0].text == first.completions[1].text
    finally:
        asyncio.run(teacher.aclose())


# --- <think> blocks in the text ----------------------------------------------

THINK_PIECES = ["<think>", "a", " b", "</think>", "\n\n", "The", " end"]


def _thinking_output(pieces, with_logprobs=True):
    """A one-sample RequestOutput whose text is `pieces` joined, token ids 10, 11, …"""
    ids = list(range(10, 10 + len(pieces)))
    positions = [{i: lp(-0.5, 1, p)} for i, p in zip(ids, pieces)] if with_logprobs else None
    sample = SimpleNamespace(index=0, text="".join(pieces), token_ids=ids, finish_reason="stop", logprobs=positions)
    return SimpleNamespace(prompt_token_ids=[1, 2], outputs=[sample])


def test_to_chat_response_splits_a_think_block():
    resp = to_chat_response(_thinking_output(THINK_PIECES), SamplingParams(logprobs=1), "m")
    [c] = resp.completions
    assert (c.text, c.reasoning, c.reasoning_tokens, c.completion_tokens) == ("The end", "a b", 5, 7)
    assert [t.id for t in c.logprobs] == [15, 16] and "".join(t.token for t in c.logprobs) == c.text
    assert resp.usage.reasoning_tokens == 5 and resp.usage.completion_tokens == 7


def test_think_block_tokens_counted_with_the_engine_tokenizer():
    """Without logprobs the engine's tokenizer counts the thinking tokens."""
    vocab = dict(zip(range(10, 17), THINK_PIECES))

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    resp = to_chat_response(_thinking_output(THINK_PIECES, with_logprobs=False), SamplingParams(), "m", decode)
    [c] = resp.completions
    assert (c.text, c.reasoning, c.reasoning_tokens, c.logprobs) == ("The end", "a b", 5, None)


def test_think_block_misaligned_with_tokens_drops_logprobs():
    """A token spanning the gap and the answer (" The"): no logprobs rather than shifted ones."""
    pieces = ["<think>", "a", "</think>", " The", " end"]
    [c] = to_chat_response(_thinking_output(pieces), SamplingParams(logprobs=1), "m").completions
    assert (c.text, c.reasoning, c.completion_tokens, c.logprobs) == ("The end", "a", 5, None)


def test_teacher_splits_a_think_block(fake_vllm, monkeypatch):
    class ThinkingLLM(FakeLLM):
        """Thinks before answering; its tokenizer spells one character per token id."""

        def chat(self, conversations, sampling_params, use_tqdm=True):
            text = "<think>let me see</think>\n\nyes"
            sample = SimpleNamespace(index=0, text=text, token_ids=[ord(ch) for ch in text], finish_reason="stop", logprobs=None)
            return [SimpleNamespace(prompt_token_ids=[0], outputs=[sample]) for _ in conversations]

        def get_tokenizer(self):
            return SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "".join(map(chr, ids)))

    monkeypatch.setattr(fake_vllm, "LLM", ThinkingLLM)
    teacher = build_teacher(TeacherSettings(backend="vllm", model="m"))
    [res] = asyncio.run(teacher.generate([ask("q")]))
    [c] = res.completions
    assert (c.text, c.reasoning, c.reasoning_tokens) == ("yes", "let me see", len("<think>let me see</think>\n\n"))
    assert teacher.stats.reasoning_tokens == c.reasoning_tokens and teacher.stats.completion_tokens == c.completion_tokens


def test_the_cache_identity_holds_what_decides_the_output(fake_vllm, tmp_path):
    """Retrained weights at the same path, another dtype, quantization or context: never the old answers."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")

    def identity(**settings):
        return build_teacher(TeacherSettings(backend="vllm", model=str(model), **settings)).cache_identity()

    base = identity()
    assert base["dtype"] == "auto" and "model_files" in base
    assert identity(dtype="bfloat16") != base
    assert identity(engine_args={"quantization": "fp8"}) != base
    assert identity(engine_args={"max_model_len": 4096}) != base
    assert identity(engine_args={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5}) == base, "speed only"
    (model / "model.safetensors").write_bytes(b"weights v2, retrained")
    assert identity() != base


def test_vllms_parallelism_reaches_the_engine_as_given():
    args = {"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "data_parallel_size": 4}
    assert engine_kwargs(TeacherSettings(backend="vllm", model="m", engine_args=args)).items() >= args.items()

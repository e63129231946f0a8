"""The openai backend through llama.cpp's real OpenAI-compatible server and the official client.

llama.cpp ignores `n`, answers logprobs, refuses `json_schema` response formats
with a 500 and accepts `json_object` with a schema: each test checks the backend
notices and falls back. The server runs one request at a time (~90 tok/s, ~16
with logprobs), so max_tokens stays small.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from synth.teachers import ChatRequest, SamplingParams, TeacherSettings
from synth.teachers.openai_api import OpenAITeacher

SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
}


@pytest.fixture
def teacher(llama_server):
    return OpenAITeacher(TeacherSettings(backend="openai", model="smollm2", base_url=llama_server, timeout=60, max_retries=2))


def run(teacher: OpenAITeacher, coro_fn):
    async def go():
        try:
            return await coro_fn()
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def chat(content: str, **params) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": content}], params=SamplingParams(**params))


def test_text_answer(teacher):
    [res] = run(teacher, lambda: teacher.generate([chat("What is the capital of France? Answer in one word.", temperature=0, max_tokens=16)]))
    assert not isinstance(res, Exception), res
    [c] = res.completions
    assert "Paris" in c.text
    assert c.finish_reason in ("stop", "length")
    assert res.usage.prompt_tokens > 0 and 0 < res.usage.completion_tokens <= 16 and c.completion_tokens == res.usage.completion_tokens
    assert teacher.stats.requests_ok == 1 and teacher.stats.retries == 0


def test_n2_falls_back_to_separate_seeded_requests(teacher):
    [res] = run(teacher, lambda: teacher.generate([chat("Say hi", n=2, seed=1, temperature=1.0, max_tokens=8)]))
    assert not isinstance(res, Exception), res
    assert len(res.completions) == 2 and all(c.text for c in res.completions)
    assert teacher.n_supported is False and any("of n=2" in n for n in teacher.notes)
    # Two requests were billed: both prompts are counted.
    assert res.usage.completion_tokens == sum(c.completion_tokens for c in res.completions)
    assert res.usage.prompt_tokens >= 2 * 10


def test_top3_logprobs(teacher):
    [res] = run(teacher, lambda: teacher.generate([chat("Say hi", logprobs=3, temperature=0, max_tokens=5)]))
    assert not isinstance(res, Exception), res
    [c] = res.completions
    assert c.logprobs and len(c.logprobs) == c.completion_tokens
    for tok in c.logprobs:
        assert tok.logprob <= 0 and tok.id is None
        assert len(tok.top) == 3 and [t.logprob for t in tok.top] == sorted((t.logprob for t in tok.top), reverse=True)
    # Greedy: the chosen token is the most likely one.
    assert c.logprobs[0].logprob == pytest.approx(c.logprobs[0].top[0].logprob)


def test_json_schema_via_json_object_fallback(teacher):
    [res] = run(teacher, lambda: teacher.generate([chat("Pick a color.", json_schema=SCHEMA, temperature=0, max_tokens=40)]))
    assert not isinstance(res, Exception), res
    jsonschema.validate(json.loads(res.completions[0].text), SCHEMA)
    assert teacher.json_mode_for(SCHEMA) == "json_object"
    assert any(n.startswith("json_schema refused (HTTP 500") for n in teacher.notes)
    assert "structured output: using json_object" in teacher.notes


def test_capabilities_probe(teacher):
    caps = run(teacher, teacher.capabilities)
    assert caps.n is False and caps.logprobs is True and caps.json_schema == "json_object"
    assert caps.latency_s is not None and 0 < caps.latency_s < 30
    assert any("n=2" in n for n in caps.notes) and any("json_schema refused" in n for n in caps.notes)

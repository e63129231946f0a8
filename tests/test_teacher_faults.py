"""The openai backend against a real HTTP server that misbehaves: what is retried, when, and how often."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from synth.teachers import (
    ChatRequest,
    PermanentTeacherError,
    SamplingParams,
    TeacherSettings,
    TransientTeacherError,
)
from synth.teachers.base import TeacherStats
from synth.teachers.openai_api import OpenAITeacher, normalize_base_url
from synth.teachers.retry import RetryPolicy, call_with_retries, parse_retry_after


def make_teacher(server, **overrides) -> OpenAITeacher:
    cfg = dict(backend="openai", model="fault-model", base_url=server.base_url, timeout=2.0, max_retries=3, backoff_base=0.01, backoff_max=0.05)
    cfg.update(overrides)
    return OpenAITeacher(TeacherSettings(**cfg))


def seed_of(content: str, index: int = 0, **params) -> int | None:
    """The seed sample `index` of a one-message request is sent with."""
    return ChatRequest(messages=[{"role": "user", "content": content}], params=SamplingParams(**params)).sample_seed(index)


def ask(teacher: OpenAITeacher, *contents: str, **params):
    """Run one generate call over fresh requests; returns the results list."""
    reqs = [ChatRequest(messages=[{"role": "user", "content": c}], params=SamplingParams(**params)) for c in contents]

    async def go():
        try:
            return await teacher.generate(reqs)
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def test_429_waits_at_least_retry_after(fault_server):
    fault_server.retry_after = 0.4
    teacher = make_teacher(fault_server)
    [res] = ask(teacher, "hello !fault=429*1", seed=1)
    assert res.completions[0].text == f"echo: hello !fault=429*1 #{seed_of('hello !fault=429*1', seed=1)}"
    t = fault_server.arrival_times
    assert len(t) == 2 and t[1] - t[0] >= 0.4  # backoff_max is 0.05: only Retry-After explains the wait
    assert teacher.stats.retries == 1 and teacher.stats.requests_ok == 1


@pytest.mark.parametrize("fault", ["500", "503"])
def test_5xx_is_retried_then_succeeds(fault_server, fault):
    teacher = make_teacher(fault_server)
    [res] = ask(teacher, f"x !fault={fault}*2")
    assert res.completions[0].text.startswith("echo: x")
    assert fault_server.received == 3 and fault_server.faults() == {fault: 2}
    assert teacher.stats.retries == 2


def test_stall_past_timeout_is_retried(fault_server):
    fault_server.stall_s = 10
    teacher = make_teacher(fault_server, timeout=0.5)
    t0 = time.monotonic()
    [res] = ask(teacher, "slow !fault=stall*1")
    assert res.completions[0].text.startswith("echo: slow")
    assert 0.5 <= time.monotonic() - t0 < fault_server.stall_s, "abandoned at the timeout, not after the stall"
    assert fault_server.received == 2 and teacher.stats.retries == 1


@pytest.mark.parametrize("fault", ["drop", "badjson", "empty"])
def test_broken_responses_are_retried(fault_server, fault):
    teacher = make_teacher(fault_server)
    [res] = ask(teacher, f"y !fault={fault}*1")
    assert isinstance(res.completions[0].text, str) and res.completions[0].text.startswith("echo: y")
    assert fault_server.received == 2 and fault_server.faults() == {fault: 1}


def test_400_is_permanent_and_not_retried(fault_server):
    teacher = make_teacher(fault_server)
    [res] = ask(teacher, "bad !fault=400")
    assert isinstance(res, PermanentTeacherError) and not res.retryable
    assert res.status == 400 and "injected bad request" in res.reason and res.reason.startswith("HTTP 400")
    assert fault_server.received == 1 and teacher.stats.retries == 0 and teacher.stats.errors == 1


def test_exhausted_retries_come_back_in_the_results(fault_server):
    teacher = make_teacher(fault_server, max_retries=3)
    results = ask(teacher, "fine", "doomed !fault=503", "also fine")
    assert [type(r).__name__ for r in results] == ["ChatResponse", "TransientTeacherError", "ChatResponse"]
    assert results[1].status == 503 and results[1].retryable
    assert fault_server.faults() == {"503": 4}  # 1 try + max_retries, never more
    assert teacher.stats.retries == 3 and teacher.stats.errors == 1 and teacher.stats.requests_ok == 2


def test_zero_retries_sends_once(fault_server):
    teacher = make_teacher(fault_server, max_retries=0)
    [res] = ask(teacher, "z !fault=500")
    assert isinstance(res, TransientTeacherError) and fault_server.received == 1


def test_n_fallback_asks_again_with_seeds(fault_server):
    fault_server.honor_n = False
    teacher = make_teacher(fault_server)
    [res] = ask(teacher, "q", n=3, seed=10)
    assert [c.text for c in res.completions] == [f"echo: q #{seed_of('q', i, n=3, seed=10)}" for i in range(3)]
    assert teacher.n_supported is False and any("n=3" in note for note in teacher.notes)
    assert fault_server.received == 3 and res.cached == [False] * 3
    assert res.usage.completion_tokens == 9
    # Once learned, every sample is asked for separately: still 3 requests, no wasted n=3.
    fault_server.reset()
    [res] = ask(teacher, "r", n=3, seed=0)
    assert [c.text for c in res.completions] == [f"echo: r #{seed_of('r', i, n=3, seed=0)}" for i in range(3)]
    assert fault_server.received == 3 and all("n" not in b for b in fault_server.bodies)


def test_n_honoured_in_one_request(fault_server):
    teacher = make_teacher(fault_server)
    [res] = ask(teacher, "q", n=2, seed=3, logprobs=2)
    assert [c.text for c in res.completions] == [f"echo: q #{seed_of('q', i, n=2, seed=3, logprobs=2)}" for i in range(2)]
    assert fault_server.received == 1 and teacher.n_supported is True
    lp = res.completions[0].logprobs
    assert lp[0].token == "echo:" and len(lp[0].top) == 2 and lp[0].id is None


def test_json_schema_refusal_falls_back_without_retrying(fault_server):
    fault_server.json_schema = False
    teacher = make_teacher(fault_server)
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    [res] = ask(teacher, "j", json_schema=schema)
    assert fault_server.received == 2 and teacher.stats.retries == 0
    assert [b["response_format"]["type"] for b in fault_server.bodies] == ["json_schema", "json_object"]
    assert teacher.json_mode_for(schema) == "json_object" and any("json_schema refused" in n for n in teacher.notes)
    assert res.completions[0].text.startswith("{")


def test_prompting_is_the_last_fallback(fault_server):
    fault_server.json_schema = fault_server.json_object = False
    teacher = make_teacher(fault_server)
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}}
    reqs = [ChatRequest(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"p{i}"}],
                        params=SamplingParams(json_schema=schema)) for i in range(3)]

    async def go():
        return await teacher.generate(reqs)

    results = asyncio.run(go())
    assert all(r.completions for r in results) and teacher.json_mode_for(schema) == "prompt"
    # One request probed (3 tries); the two that waited for it went straight to prompting.
    kinds = [(b.get("response_format") or {}).get("type") for b in fault_server.bodies]
    assert kinds == ["json_schema", "json_object", None, None, None]
    sys_msg = fault_server.bodies[-1]["messages"][0]
    assert sys_msg["role"] == "system" and sys_msg["content"].startswith("Be terse.") and '"echo"' in sys_msg["content"]
    assert "structured output: using prompt" in teacher.notes


def test_capabilities_against_a_capable_server(fault_server):
    teacher = make_teacher(fault_server)
    caps = asyncio.run(teacher.capabilities())
    assert (caps.n, caps.logprobs, caps.json_schema) == (True, True, "json_schema") and caps.latency_s > 0
    fault_server.honor_n = False
    fault_server.json_schema = False
    caps = asyncio.run(make_teacher(fault_server).capabilities())
    assert (caps.n, caps.logprobs, caps.json_schema) == (False, True, "json_object")


def test_concurrency_limit_and_many_connections(fault_server):
    fault_server.latency = 0.5  # long enough for 300 requests to be in flight together, even on a loaded machine
    teacher = make_teacher(fault_server, concurrency=300)
    results = ask(teacher, *[f"m{i}" for i in range(300)])
    assert all(r.completions[0].text == f"echo: m{i} #c0" for i, r in enumerate(results))
    assert fault_server.max_in_flight > 100, "the requests were in flight together"
    fault_server.reset()
    teacher = make_teacher(fault_server, concurrency=4)
    ask(teacher, *[f"k{i}" for i in range(12)])
    assert fault_server.max_in_flight <= 4 and fault_server.completed == 12


def test_api_key_never_leaks(fault_server, monkeypatch):
    secret = "sk-test-SECRET-123456"
    monkeypatch.setenv("MY_TEACHER_KEY", secret)
    url = fault_server.base_url.replace("http://", "http://user:pw@")
    teacher = make_teacher(fault_server, api_key_env="MY_TEACHER_KEY", base_url=url, max_retries=0)
    results = ask(teacher, "a !fault=400", "b !fault=500", "c !fault=drop")
    texts = [repr(teacher), teacher.spec, str(teacher.cache_identity()), *(repr(r) + r.reason for r in results)]
    assert not any(secret in t or "pw@" in t for t in texts)
    assert teacher.cache_identity() == {"backend": "openai", "model": "fault-model", "base_url": fault_server.base_url}


def test_normalize_base_url():
    assert normalize_base_url("HTTP://u:p@LocalHost:8000/v1/?x=1") == "http://localhost:8000/v1"


def test_retry_policy_delays():
    rng = random.Random(0)
    full = RetryPolicy(max_retries=5, base=0.5, max_delay=4.0)
    assert all(0 <= full.delay(a, rng=rng) <= min(4.0, 0.5 * 2**a) for a in range(10) for _ in range(20))
    assert full.delay(0, retry_after=10.0, rng=rng) == 10.0  # above max_delay: the server knows best
    assert full.delay(0, retry_after=10_000, rng=rng) == 300.0
    dec = RetryPolicy(base=0.5, max_delay=4.0, jitter="decorrelated")
    prev = None
    for a in range(10):
        prev = dec.delay(a, previous=prev, rng=rng)
        assert 0.5 <= prev <= 4.0


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after({"retry-after": later}) <= 31


def test_call_with_retries_counts_and_never_retries_permanent():
    stats, calls, slept = TeacherStats(), [], []

    async def sleep(s):
        slept.append(s)

    async def flaky():
        calls.append(1)
        raise TransientTeacherError("busy", status=503)

    async def bad():
        calls.append(1)
        raise PermanentTeacherError("no", status=400)

    policy = RetryPolicy(max_retries=2, base=0.1, max_delay=1.0)
    with pytest.raises(TransientTeacherError):
        asyncio.run(call_with_retries(flaky, policy, stats, sleep=sleep))
    assert len(calls) == 3 and stats.retries == 2 and len(slept) == 2
    calls.clear()
    with pytest.raises(PermanentTeacherError):
        asyncio.run(call_with_retries(bad, policy, stats, sleep=sleep))
    assert len(calls) == 1 and stats.retries == 2

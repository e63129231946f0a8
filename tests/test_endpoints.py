"""One openai teacher over several endpoints: balanced by requests in flight, a failing one rested, a job completes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from synth.teachers import ChatRequest, SamplingParams, TeacherSettings
from synth.teachers.endpoints import REST_AFTER, REST_S, Endpoint, EndpointPool
from synth.teachers.openai_api import OpenAITeacher
from tests.fault_server import fault_server


def ask_all(teacher: OpenAITeacher, count: int):
    reqs = [ChatRequest(messages=[{"role": "user", "content": f"q{i}"}], params=SamplingParams()) for i in range(count)]

    async def go():
        try:
            return await teacher.generate(reqs)
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def test_requests_are_spread_over_the_endpoints_by_what_they_have_in_flight():
    with fault_server(latency=0.05) as a, fault_server(latency=0.05) as b:
        teacher = OpenAITeacher(TeacherSettings(backend="openai", model="m", base_urls=[a.base_url, b.base_url], concurrency=8))
        results = ask_all(teacher, 40)
        assert all(r.completions for r in results)
        assert a.completed + b.completed == 40 and abs(a.completed - b.completed) <= 4
    identity = teacher.cache_identity()
    assert identity["base_url"] == sorted([a.base_url, b.base_url]), "replicas share one cache identity"
    swapped = OpenAITeacher(TeacherSettings(backend="openai", model="m", base_urls=[b.base_url, a.base_url]))
    assert swapped.cache_identity() == identity


def test_a_failing_endpoint_is_rested_and_the_job_completes(tmp_path):
    with fault_server(fault_rate=1.0, fault_kinds=("500",)) as bad, fault_server() as good:
        teacher = tmp_path / "teacher.yaml"
        teacher.write_text(f"backend: openai\nmodel: m\nbase_urls: ['{bad.base_url}', '{good.base_url}']\nbackoff_base: 0.01\nbackoff_max: 0.02\n")
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(30)))
        out = tmp_path / "out.jsonl"
        env = {**os.environ, "BBD_RESPONSE_CACHE": str(tmp_path / "cache")}
        done = subprocess.run([sys.executable, "-m", "distill", "generate", "--teacher", str(teacher), "--input", str(inp),
                               "--output", str(out), "--concurrency", "2", "--quiet"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert len(out.read_text().splitlines()) == 30 and good.completed == 30
        assert bad.received <= REST_AFTER + 2, "rested after its failures, not tried for every request"
        assert f"endpoint {bad.base_url} failed {REST_AFTER} times in a row (HTTP 500); resting it" in done.stderr


def test_the_pool_picks_the_least_busy_and_comes_back_after_a_rest():
    now = [0.0]
    said = []
    pool = EndpointPool([Endpoint("a", {}, "a"), Endpoint("b", {}, "b")], say=said.append, clock=lambda: now[0])
    a, b = pool.endpoints
    a.in_flight = 2
    assert pool.pick() is b
    for _ in range(REST_AFTER):
        pool.failed(b, "HTTP 503")
    assert b.rested_until == REST_S and len(said) == 1 and pool.pick() is a
    a.rested_until = REST_S + 5
    assert pool.pick() is b, "every endpoint resting: the one back soonest"
    now[0] = REST_S
    assert pool.pick() is b


def test_base_url_and_base_urls_are_checked():
    with pytest.raises(ValueError, match="base_url or base_urls, not both"):
        TeacherSettings(backend="openai", model="m", base_url="http://a/v1", base_urls=["http://b/v1"])
    with pytest.raises(ValueError, match="expected an http"):
        TeacherSettings(backend="openai", model="m", base_urls=["ftp://b/v1"])

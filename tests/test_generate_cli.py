"""`distill generate` as a user runs it: cache, kill -9 and resume, rejects, bad input, exit codes.

The teacher is a real HTTP server (tests/fault_server.py) in this process; `distill` runs
as a subprocess, so the server counts exactly what the CLI sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth.teachers.cache import ResponseCache
from tests.fault_server import fault_server


def run_cli(*args: str, cache: Path, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=120, **kw)


def write_prompts(path: Path, count: int, fault: str = "") -> Path:
    with path.open("w") as fh:
        for i in range(count):
            fh.write(json.dumps({"prompt": f"question {i}{fault if i == 3 else ''}"}) + "\n")
    return path


def lines(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines())


def test_rerun_sends_zero_requests_and_more_samples_pay_only_the_difference(tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "cache"
    with fault_server() as server:
        teacher = f"openai:echo@{server.base_url}"
        first = run_cli("generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "-n", "2", "--seed", "7", "--quiet", cache=cache)
        assert first.returncode == 0, first.stderr
        assert server.completed == 20
        assert "wrote 40 records" in first.stdout
        before = lines(out)
        assert len(before) == 40 and len({json.loads(line)["id"] for line in before}) == 40

        again = run_cli("generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "-n", "2", "--seed", "7", "--quiet", cache=cache)
        assert again.returncode == 0, again.stderr
        assert server.completed == 20, "a rerun must not send a single request"
        assert lines(out) == before
        assert "0 requests sent, 40 samples from cache" in again.stdout

        more = run_cli("generate", "--teacher", teacher, "--input", str(prompts), "--output", str(tmp_path / "more.jsonl"), "-n", "3", "--seed", "7", "--quiet", cache=cache)
        assert more.returncode == 0, more.stderr
        assert server.completed == 40, "n=3 after n=2 asks for the third sample only"
        assert all(b.get("n", 1) == 1 for b in server.bodies[20:])

        refresh = run_cli("generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "-n", "2", "--seed", "7", "--quiet", "--refresh", cache=cache)
        assert refresh.returncode == 0 and server.completed == 60

        stored = ResponseCache(cache).count()
        uncached = run_cli("generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "-n", "4", "--seed", "7", "--quiet", "--no-cache", cache=cache)
        assert uncached.returncode == 0 and server.completed == 80, "--no-cache reads nothing"
        assert ResponseCache(cache).count() == stored, "--no-cache writes nothing"


def test_kill_9_then_rerun_sends_only_what_was_missing(tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", 150)
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with fault_server(latency=0.02) as server:
        teacher = f"openai:echo@{server.base_url}"
        args = ["generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "--concurrency", "4", "--quiet"]
        env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
        proc = subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = out.with_name(out.name + ".partial")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 41:  # the job's header line + 40 tasks
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists(), "a killed job leaves no output file, only its journal"
        stored = ResponseCache(cache).count()
        assert 40 <= stored < 150
        server.wait_idle()  # what the dead client had sent reaches the server and is counted
        sent_before = server.received

        rerun = run_cli(*args, cache=cache)
        assert rerun.returncode == 0, rerun.stderr
        assert server.received - sent_before == 150 - stored, "only the responses that never arrived are asked for again"

        clean = tmp_path / "clean.jsonl"
        base = run_cli(*[a if a != str(out) else str(clean) for a in args], cache=tmp_path / "other-cache")
        assert base.returncode == 0, base.stderr
    assert lines(out) == lines(clean), "resumed output equals an uninterrupted run's"


def test_teacher_failures_become_rejects_and_are_retried_by_the_next_run(tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", 6, fault=" !fault=400*1")
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with fault_server() as server:
        args = ["generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(out), "--quiet"]
        first = run_cli(*args, cache=cache)
        assert first.returncode == 0, first.stderr
        assert "wrote 5 records" in first.stdout and "1 inputs failed at the teacher" in first.stdout
        (reject,) = [json.loads(x) for x in out.with_name("out.rejects.jsonl").read_text().splitlines()]
        assert reject["error"] is True and "HTTP 400" in reject["reason"] and reject["input"]["prompt"].startswith("question 3")

        second = run_cli(*args, cache=cache)  # the fault was for the first request only
        assert second.returncode == 0, second.stderr
        assert "wrote 6 records" in second.stdout
        assert out.with_name("out.rejects.jsonl").read_text() == ""


def test_json_schema_answers_are_validated_resampled_then_rejected(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string"}}}))
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "give json"}) + "\n")
    out = tmp_path / "out.jsonl"
    with fault_server() as server:
        result = run_cli("generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(out), "--json-schema", str(schema), "--quiet", cache=tmp_path / "cache")
        assert result.returncode == 0, result.stderr
        assert server.completed == 2, "one invalid answer is resampled once"
        greedy = tmp_path / "greedy.jsonl"
        result = run_cli("generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(greedy),
                         "--json-schema", str(schema), "--temperature", "0", "--quiet", cache=tmp_path / "cache")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert server.completed == 3, "a greedy request is never resampled: it would get the same reply"
    (reject,) = [json.loads(x) for x in out.with_name("out.rejects.jsonl").read_text().splitlines()]
    assert "sample 1" in reject["reason"] and "does not match the schema" in reject["reason"] and reject["raw"]
    assert out.read_text() == ""
    (greedy_reject,) = [json.loads(x) for x in greedy.with_name("greedy.rejects.jsonl").read_text().splitlines()]
    assert "sample 0" in greedy_reject["reason"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "ok2"\n', "in.jsonl:2: invalid JSON"),
        ('{"prompt": "ok"}\n{"messages": [{"role": "user"}]}\n', "in.jsonl:2: field 'messages.0.content': Field required"),
        ("", "in.jsonl: file is empty"),
    ],
)
def test_bad_input_fails_before_any_request_and_writes_nothing(tmp_path, content, message):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(content)
    out = tmp_path / "out.jsonl"
    with fault_server() as server:
        result = run_cli("generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(out), cache=tmp_path / "cache")
        assert server.received == 0
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists() and not out.with_name("out.jsonl.partial").exists()


def test_unknown_teacher_spec_and_refused_connection(tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    bad = run_cli("generate", "--teacher", "ollama:llama3", "--input", str(prompts), "--output", str(out), cache=tmp_path / "c")
    assert bad.returncode == 1 and "unknown teacher spec 'ollama:llama3'" in bad.stderr

    from tests.conftest import free_port

    refused = run_cli(
        "generate", "--teacher", f"openai:m@http://127.0.0.1:{free_port()}/v1", "--max-retries", "1",
        "--input", str(prompts), "--output", str(out), "--quiet", cache=tmp_path / "c",
    )
    assert refused.returncode == 1
    assert "every request to openai:m" in refused.stderr and "failed" in refused.stderr
    assert not out.exists()


def test_a_second_ctrl_c_aborts_at_once_while_the_first_waits_for_requests_in_flight(tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", 4, fault="!fault=stall")
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with fault_server(stall_s=60) as server:
        args = ["generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(out), "--quiet"]
        env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
        proc = subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.faults().get("stall", 0) < 1:  # the stalled request is in flight
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert "stopping: waiting for the requests in flight" in proc.stderr.readline(), "the first Ctrl-C waits for what is paid for"
        assert proc.poll() is None, "still waiting: the stalled request has not answered"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)  # the stall lasts 60 s: only an abort ends it this soon
        assert proc.returncode == 130
        assert not out.exists() and out.with_name(out.name + ".partial").exists(), "the journal is kept for a rerun"

"""Batch mode (`batch: true`): OpenAI's Batch API through the official client, against tests/batch_server.py.

The batch server is real HTTP (files, batches, listing by metadata, cancel) and answers every line
by forwarding its body to llama.cpp's real server (the `llama_server` fixture), except where a test
only checks bookkeeping (echo answers, marked). It counts batches created and lines answered, and
how often each line was answered, so every test can assert that nothing was asked twice.
llama.cpp answers one request at a time on 2 cores: prompts are short and answers 4 tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from synth.errors import ConfigError
from synth.teachers import (
    ChatRequest,
    SamplingParams,
    TeacherSettings,
    build_teacher,
    parse_teacher_spec,
)
from synth.teachers.base import PermanentTeacherError
from synth.teachers.batch import BatchTeacher
from synth.teachers.openai_api import OpenAITeacher
from tests.batch_server import BatchServer

WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


@pytest.fixture
def server(llama_server):
    """A batch server answering through llama.cpp, for one test."""
    srv = BatchServer(upstream=llama_server).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def echo_server():
    """A batch server answering `echo: <prompt> #<choice>` (no model): for bookkeeping-only tests."""
    srv = BatchServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def teacher_file(tmp_path: Path, server: BatchServer, model: str = "smollm2", **extra) -> Path:
    settings = {"backend": "openai", "model": model, "base_url": server.base_url, "batch": True, "batch_poll_interval": 0.02,
                "max_retries": 2, "backoff_base": 0.01, "timeout": 60, **extra}  # fmt: skip
    path = tmp_path / f"batch-{len(list(tmp_path.glob('batch-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def prompts(tmp_path: Path, words: list[str]) -> Path:
    path = tmp_path / f"in-{len(words)}-{words[0]}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say the word {w}."}) + "\n" for w in words))
    return path


def generate(teacher: Path | str, inputs: Path, out: Path) -> list[str]:
    return ["generate", "--teacher", str(teacher), "--input", str(inputs), "--output", str(out),
            "--max-tokens", "4", "--temperature", "0", "--keep-truncated", "--quiet"]  # fmt: skip


def records(path: Path) -> dict[str, str]:
    """prompt -> answer of each record."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in rows}


def spawn(args: list[str], cache: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), **env}
    return subprocess.Popen([sys.executable, "-m", "distill", *args], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recorded(cache: Path) -> list[tuple]:
    """(batch id, status, collected) of each batch in the state file."""
    db = cache / "batches.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute("SELECT batch_id, status, collected FROM batches ORDER BY created").fetchall()


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def answered_once(server: BatchServer, lines: int) -> None:
    server.wait_idle()
    assert server.lines_answered == lines and sum(server.answered.values()) == lines
    assert max(server.answered.values()) == 1, "a line was answered twice: paid twice"


# -- whole jobs through llama.cpp -------------------------------------------------------------------


def test_a_batch_job_then_online_then_batch_share_one_cache(server, tmp_path, cache_dir, capsys):
    teacher = teacher_file(tmp_path, server)
    assert main(generate(teacher, prompts(tmp_path, WORDS[:2]), tmp_path / "batch.jsonl")) == 0
    cap = capsys.readouterr()
    assert server.batches_created == 1 and server.online_requests == 0
    answered_once(server, 2)
    assert "submitted batch_" in cap.err and "2 requests sent, 0 samples from cache" in cap.out
    batch_answers = records(tmp_path / "batch.jsonl")
    assert len(batch_answers) == 2 and all(batch_answers.values())
    rows = [json.loads(x) for x in (tmp_path / "batch.jsonl").read_text().splitlines()]
    assert {r["provenance"]["teacher"] for r in rows} == {f"openai:smollm2@{server.base_url}"}, "named as the online teacher is"

    # Online, same model and endpoint: the batch's 2 answers come from the cache, only the new prompt goes out.
    online = f"openai:smollm2@{server.base_url}"
    assert main(generate(online, prompts(tmp_path, WORDS[:3]), tmp_path / "online.jsonl")) == 0
    cap = capsys.readouterr()
    assert server.online_requests == 1 and server.batches_created == 1
    assert "1 requests sent, 2 samples from cache" in cap.out
    online_answers = records(tmp_path / "online.jsonl")
    assert {k: online_answers[k] for k in batch_answers} == batch_answers

    # Batch again over 4: only the one never asked goes into a (second) batch.
    assert main(generate(teacher, prompts(tmp_path, WORDS[:4]), tmp_path / "batch4.jsonl")) == 0
    cap = capsys.readouterr()
    assert server.batches_created == 2 and server.online_requests == 1
    assert [len(b["lines"]) for b in server.batches.values()] == [2, 1]
    answered_once(server, 3)
    assert "1 requests sent, 3 samples from cache" in cap.out
    assert len(records(tmp_path / "batch4.jsonl")) == 4
    assert [r[2] for r in recorded(cache_dir)] == [1, 1], "both batches collected"
    assert main(["batch", "status", "--teacher", str(teacher)]) == 0
    assert "no batch waiting to be collected" in capsys.readouterr().out


def test_killed_between_submit_and_download_reattaches(server, tmp_path, cache_dir, capsys):
    teacher = teacher_file(tmp_path, server)
    args = generate(teacher, prompts(tmp_path, WORDS[:2]), tmp_path / "out.jsonl")
    server.hold = True  # the batch stays in progress: the job is waiting for it when it is killed
    proc = spawn(args, cache_dir)
    try:
        wait_until(lambda: any(r[0] for r in recorded(cache_dir)))
        assert main(["batch", "status", "--teacher", str(teacher)]) == 0
        status = capsys.readouterr().out
        (batch_id, _, _), = recorded(cache_dir)
        assert batch_id in status and ("in_progress" in status or "validating" in status) and "1 batch: 1 running" in status
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    server.hold = False

    assert main(args) == 0
    cap = capsys.readouterr()
    assert f"re-attached to {batch_id}" in cap.err and "submitted batch_" not in cap.err
    assert server.batches_created == 1
    answered_once(server, 2)
    assert len(records(tmp_path / "out.jsonl")) == 2


def test_killed_between_create_and_recording_the_id_finds_the_batch_by_metadata(server, tmp_path, cache_dir, capsys):
    teacher = teacher_file(tmp_path, server)
    args = generate(teacher, prompts(tmp_path, WORDS[:2]), tmp_path / "out.jsonl")
    proc = spawn(args, cache_dir, BBD_BATCH_TEST_HOOK="kill_after_create")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert server.batches_created == 1 and recorded(cache_dir) == [(None, "creating", 0)], "created, its id never recorded"

    assert main(args) == 0
    cap = capsys.readouterr()
    assert "by its metadata" in cap.err and "submitted batch_" not in cap.err
    assert server.batches_created == 1 and server.lists >= 1
    answered_once(server, 2)
    assert len(records(tmp_path / "out.jsonl")) == 2


def test_failed_lines_go_into_a_new_batch(server, tmp_path, cache_dir, capsys):
    server.fail_lines["banana"] = 1  # that line's first answer is a 500
    assert main(generate(teacher_file(tmp_path, server), prompts(tmp_path, WORDS[:3]), tmp_path / "out.jsonl")) == 0
    cap = capsys.readouterr()
    assert server.batches_created == 2
    assert [len(b["lines"]) for b in server.batches.values()] == [3, 1]
    answered_once(server, 3)
    assert "HTTP 500" in cap.err
    assert len(records(tmp_path / "out.jsonl")) == 3 and (tmp_path / "out.rejects.jsonl").read_text() == ""


def test_an_expired_batch_is_retried_in_a_new_batch(server, tmp_path, cache_dir, capsys):
    server.expire_next, server.expire_after = 1, 1  # the first batch answers 1 line, then expires
    assert main(generate(teacher_file(tmp_path, server), prompts(tmp_path, WORDS[:3]), tmp_path / "out.jsonl")) == 0
    cap = capsys.readouterr()
    assert "expired" in cap.err and server.batches_created == 2
    assert [len(b["lines"]) for b in server.batches.values()] == [3, 2]
    answered_once(server, 3)
    assert len(records(tmp_path / "out.jsonl")) == 3


def test_an_expired_batch_goes_online_with_the_online_fallback(server, tmp_path, cache_dir, capsys):
    server.expire_next, server.expire_after = 1, 1
    teacher = teacher_file(tmp_path, server, batch_fallback="online")
    assert main(generate(teacher, prompts(tmp_path, WORDS[:2]), tmp_path / "out.jsonl")) == 0
    cap = capsys.readouterr()
    assert "1 requests that failed in a batch go online" in cap.err
    assert server.batches_created == 1 and server.online_requests == 1
    answered_once(server, 1)
    assert len(records(tmp_path / "out.jsonl")) == 2


def test_a_failed_batch_is_submitted_again(server, tmp_path, cache_dir, capsys):
    server.fail_next = 1
    assert main(generate(teacher_file(tmp_path, server), prompts(tmp_path, WORDS[:1]), tmp_path / "out.jsonl")) == 0
    cap = capsys.readouterr()
    assert "failed" in cap.err and "token_limit_exceeded" in cap.err
    assert server.batches_created == 2
    answered_once(server, 1)
    assert len(records(tmp_path / "out.jsonl")) == 1


# -- bookkeeping, with echo answers ----------------------------------------------------------------


def test_cancel_stops_the_running_batch_and_a_rerun_asks_only_for_the_rest(echo_server, tmp_path, cache_dir, capsys):
    echo_server.hold, echo_server.hold_after = True, 2  # answers 2 lines, then waits: cancelled there
    teacher = teacher_file(tmp_path, echo_server, model="echo")
    args = generate(teacher, prompts(tmp_path, WORDS[:6]), tmp_path / "out.jsonl")
    proc = spawn(args, cache_dir)
    try:
        wait_until(lambda: any(r[0] for r in recorded(cache_dir)))
        assert main(["batch", "cancel", "--teacher", str(teacher)]) == 0
        assert "cancelling" in capsys.readouterr().out
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "cancelled" in err
    answered = echo_server.lines_answered
    assert answered == 2 and "wrote 2 records" in out and "4 inputs failed at the teacher" in out

    echo_server.hold = False
    assert main(args) == 0
    capsys.readouterr()
    assert echo_server.batches_created == 2
    assert [len(b["lines"]) for b in echo_server.batches.values()] == [6, 4]
    answered_once(echo_server, 6)
    assert len(records(tmp_path / "out.jsonl")) == 6


def run(teacher, requests):
    async def go():
        try:
            return await teacher.generate(requests)
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def chat(text: str, **params) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], params=SamplingParams(max_tokens=4, **params))


def test_same_identity_and_name_as_the_online_teacher_and_batch_prices(echo_server, cache_dir):
    base = dict(backend="openai", model="m", base_url=echo_server.base_url, price_per_mtok_in=2.0, price_per_mtok_out=8.0)
    batch, online = build_teacher(TeacherSettings(**base, batch=True)), build_teacher(TeacherSettings(**base))
    assert isinstance(batch, BatchTeacher) and isinstance(online, OpenAITeacher)
    assert batch.cache_identity() == online.cache_identity() and batch.spec == online.spec
    assert (batch.prices.prompt, batch.prices.completion) == (1.0, 4.0), "OpenAI's batch price: half"
    cheaper = build_teacher(TeacherSettings(**base, batch=True, batch_discount=0.25))
    assert (cheaper.prices.prompt, cheaper.prices.completion) == (0.5, 2.0)
    assert batch.batch_size > 10**9 and batch.concurrency == 1, "the runner hands it every pending request at once"


def test_batch_settings_are_checked(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("backend: transformers\nbatch: true\n")
    with pytest.raises(ConfigError, match="batch: true needs backend: openai"):
        parse_teacher_spec(str(bad))
    bad.write_text("backend: openai\nmodel: m\nbatch: true\nbase_urls: [http://a:1/v1, http://b:1/v1]\n")
    with pytest.raises(ConfigError, match="one endpoint"):
        parse_teacher_spec(str(bad))
    bad.write_text("backend: openai\nmodel: m\nbatch: true\nbatch_max_requests: 0\n")
    with pytest.raises(ConfigError, match="batch_max_requests"):
        parse_teacher_spec(str(bad))


def test_requests_are_split_to_the_limits(echo_server, cache_dir):
    config = TeacherSettings(backend="openai", model="m", base_url=echo_server.base_url, batch=True, batch_poll_interval=0.01,
                             batch_max_requests=2)  # fmt: skip
    results = run(build_teacher(config), [chat(f"q{i}") for i in range(5)])
    assert [r.completions[0].text for r in results] == [f"echo: q{i} #0" for i in range(5)]
    assert [len(b["lines"]) for b in echo_server.batches.values()] == [2, 2, 1]

    small = config.model_copy(update={"batch_max_requests": 50_000, "batch_max_bytes": 1024})
    results = run(build_teacher(small), [chat(f"r{i}") for i in range(6)] + [chat("x" * 2000)])
    assert all(r.completions for r in results[:6])
    assert isinstance(results[6], PermanentTeacherError) and "batch_max_bytes" in results[6].reason
    sizes = [len(b["lines"]) for b in list(echo_server.batches.values())[3:]]
    assert sum(sizes) == 6 and len(sizes) > 1, "one file of at most 1024 bytes each"
    answered_once(echo_server, 11)


def test_a_server_that_ignores_n_gets_a_line_per_missing_sample(echo_server, cache_dir):
    echo_server.honor_n = False
    teacher = build_teacher(TeacherSettings(backend="openai", model="m", base_url=echo_server.base_url, batch=True, batch_poll_interval=0.01))
    (result,) = run(teacher, [chat("hello", n=3, seed=5)])
    assert len(result.completions) == 3
    assert [len(b["lines"]) for b in echo_server.batches.values()] == [1, 2], "the 2 missing samples, each its own line"
    seeds = [b["lines"][i]["body"]["seed"] for b in echo_server.batches.values() for i in range(len(b["lines"]))]
    first = chat("hello", n=3, seed=5)
    assert sorted(seeds) == [first.sample_seed(i) for i in range(3)], "each sample has the seed it has online"
    assert teacher.n_supported is False


def test_a_rerun_with_more_requests_reattaches_and_sends_only_the_new_ones(echo_server, cache_dir):
    config = TeacherSettings(backend="openai", model="m", base_url=echo_server.base_url, batch=True, batch_poll_interval=0.01)
    first = build_teacher(config)
    echo_server.hold = True

    async def interrupted():
        try:
            await asyncio.wait_for(first.generate([chat(f"q{i}") for i in range(3)]), 0.5)  # a Ctrl-C twice, in effect
        finally:
            await first.aclose()

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(interrupted())
    assert echo_server.batches_created == 1
    echo_server.hold = False

    results = run(build_teacher(config), [chat(f"q{i}") for i in range(5)])
    assert [r.completions[0].text for r in results] == [f"echo: q{i} #0" for i in range(5)]
    assert [len(b["lines"]) for b in echo_server.batches.values()] == [3, 2], "the earlier batch re-attached, the 2 new in a new one"
    answered_once(echo_server, 5)

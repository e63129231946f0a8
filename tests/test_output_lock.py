"""One writer per output: a second process on the same output stops at once; the first loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth.output_lock import OutputBusy, lock_path, writing
from tests.fault_server import fault_server


def distill(*args: str, cache: Path, **kw):
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "distill", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_generate_on_the_same_output_stops_at_once_and_the_first_keeps_everything(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(30)))
    out = tmp_path / "out.jsonl"
    with fault_server(latency=0.1) as server:
        args = ["generate", "--teacher", f"openai:m@{server.base_url}", "--input", str(inp), "--output", str(out), "--concurrency", "1", "--quiet"]
        first = distill(*args, cache=tmp_path / "cache1")
        wait_for(lambda: server.completed >= 2)  # the first is writing its journal now
        second = distill(*args, cache=tmp_path / "cache2")
        _, err = second.communicate(timeout=60)
        assert first.poll() is None, "the second stopped at once, while the first was still working"
        assert second.returncode == 1
        assert f"{out}: another process (pid {first.pid}) is writing this output" in err and "Traceback" not in err
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "wrote 30 records" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(f"p{i}" for i in range(30))
    assert server.received == 30, "the second process sent nothing"
    assert not lock_path(out).exists(), "the lock goes with its holder"


def test_the_lock_is_reentrant_in_one_process_and_refused_to_another(tmp_path):
    out = tmp_path / "o.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from synth.output_lock import writing\n"
         f"with writing({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputBusy, match=f"pid {holder.pid}"):
        with writing(out):
            pass
    holder.kill()  # SIGKILL: the OS drops its lock
    holder.wait()
    with writing(out):
        with writing(out):  # a command holding its output while a job inside it holds it too
            assert lock_path(out).exists()
        assert lock_path(out).exists(), "still held by the outer block"
    assert not lock_path(out).exists()

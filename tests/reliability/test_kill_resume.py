"""Kill-and-resume: SIGKILL, Ctrl-C and SIGTERM at random moments lose nothing, duplicate nothing and re-pay nothing cached.

A small version of benchmarks/reliability.py (which kills a few-thousand-request job 20 times).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault_server import FaultServer
from tests.reliability.harness import ROOT, cli_env, kill_and_resume, run_cli
from tests.tiny_models import make_tiny_llama

CONCURRENCY = 8


def test_generate_killed_five_times_ends_equal_to_an_uninterrupted_run(tmp_path):
    signals = [signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]
    with FaultServer(latency=0.02) as server:
        report = kill_and_resume(server, tmp_path, count=250, signals=signals, concurrency=CONCURRENCY, seed=5)
    assert report.kills == len(signals), report
    assert report.records == 250
    assert (report.lost, report.extra, report.changed) == (0, 0, 0), "same record ids and content as the uninterrupted run"
    assert (report.duplicates, report.truncated) == (0, 0)
    assert report.return_codes[1] == 130 and report.return_codes[3] == 130, "Ctrl-C and SIGTERM stop cleanly"
    assert report.graceful_lost == 0, "Ctrl-C and SIGTERM wait for the answers in flight, so none is paid twice"
    assert report.repaid_after_cached == 0, "a sample that reached the cache is never asked for again"
    # Under SIGKILL an answer the server sent but the dead client never read is lost: at most what was in flight.
    assert report.max_in_flight_lost <= CONCURRENCY
    assert report.repaid == report.in_flight_lost, "every answer paid twice is one a SIGKILL lost in flight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _recipe(tmp_path: Path, base_url: str, model: Path) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What color is thing {i}?"}) + "\n" for i in range(8)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: killed
work_dir: {tmp_path}/run
teacher: openai:echo@{base_url}
stages:
  - name: answers
    command: generate
    input: {prompts}
    output: {tmp_path}/run/answers.jsonl
    quiet: true
  - name: sft
    command: train sft
    model: {model}
    data: "@answers"
    output_dir: {tmp_path}/run/student
    max_steps: 40
    save_steps: 4
    batch_size: 2
    max_length: 48
""")
    return recipe


def test_recipe_killed_while_training_resumes_from_its_last_complete_checkpoint(tmp_path, tiny):
    student = tmp_path / "run/student"
    with FaultServer() as server:
        recipe = _recipe(tmp_path, server.base_url, tiny)
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill", "run", str(recipe)], env=cli_env(tmp_path / "cache"), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not (student / "checkpoint-8/trainer_state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.003)
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "killed mid-training"
        assert not (student / "config.json").exists() and server.received == 8

        complete = max((d for d in student.glob("checkpoint-*") if (d / "trainer_state.json").exists()), key=lambda d: int(d.name[11:]))
        # What a kill inside the next save leaves: a newer checkpoint with weights cut short and no state yet.
        broken = student / f"checkpoint-{int(complete.name[11:]) + 1}"
        shutil.copytree(complete, broken)
        (broken / "trainer_state.json").unlink()
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        # A mark in the state that only a run resuming from this checkpoint carries into its metrics.
        state = json.loads((complete / "trainer_state.json").read_text())
        state["log_history"][0]["resumed_mark"] = 1
        (complete / "trainer_state.json").write_text(json.dumps(state))

        again = run_cli("run", str(recipe), cache=tmp_path / "cache")
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert server.received == 8, "the finished synthesis stage is not redone"
    assert "answers: distill" in again.stdout and "done already (unchanged): skipped" in again.stdout
    assert "resuming an interrupted run" in again.stdout
    history = json.loads((student / "metrics.json").read_text())["history"]
    assert history[0].get("resumed_mark") == 1, "training resumed from the checkpoint, not from scratch"
    assert max(row.get("step", 0) for row in history) == 40 and (student / "config.json").exists()

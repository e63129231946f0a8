"""A recipe stage whose inputs failed at the teacher is not done: `distill run` again retries exactly those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fault_server import fault_server


def distill(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_label_stage_with_teacher_failures_is_retried_by_the_next_run(tmp_path):
    questions = tmp_path / "q.jsonl"
    # Two inputs fail once (a 500 and no retries allowed), one always (a 400: no use asking again); the rest are answered at once.
    faults = {2: " !fault=500*1", 5: " !fault=500*1", 7: " !fault=400"}
    rows = [{"question": f"What is {i} + {i}?" + faults.get(i, ""), "answer": str(2 * i)} for i in range(8)]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labeled = tmp_path / "run" / "labeled.jsonl"
    with fault_server() as server:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"""
name: retries
work_dir: {tmp_path}/run
teacher: {{backend: openai, model: echo, base_url: "{server.base_url}", max_retries: 0}}
stages:
  - name: label
    command: label
    input: {questions}
    output: {labeled}
    n: 1
    keep: everything
    quiet: true
""")
        first = distill("run", str(recipe), cache=tmp_path / "cache")
        assert first.returncode == 1, first.stdout + first.stderr
        assert "stage label: 2 inputs failed at the teacher" in first.stdout and "rerun the recipe to retry them" in first.stdout
        assert server.received == 8
        failed = {json.loads(line)["input"]["question"] for line in labeled.with_name("labeled.rejects.jsonl").read_text().splitlines()}
        assert failed == {rows[2]["question"], rows[5]["question"], rows[7]["question"]}

        second = distill("run", str(recipe), cache=tmp_path / "cache")
        assert second.returncode == 0, second.stdout + second.stderr
        assert server.received == 11, "exactly the failed inputs were asked again; the rest came from the cache"
        retried = [b["messages"][-1]["content"] for b in server.bodies[8:]]
        assert all("!fault=500*1" in text or "!fault=400" in text for text in retried)
        third = distill("run", str(recipe), cache=tmp_path / "cache")
        assert third.returncode == 0 and "done already (unchanged): skipped" in third.stdout and server.received == 11
    kept = [json.loads(line) for line in labeled.read_text().splitlines()]
    assert len(kept) == 7, "none missing but the one the teacher always refuses"
    (left,) = [json.loads(line) for line in labeled.with_name("labeled.rejects.jsonl").read_text().splitlines()]
    assert left["input"]["question"] == rows[7]["question"] and left["retryable"] is False

"""--budget-usd: requests stop before the budget could be passed, the rest are rejects, a larger budget finishes the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from synth.teachers.base import ChatRequest, Prices, SamplingParams
from synth.teachers.budget import Budget, worst_case
from tests.fault_server import fault_server


def distill(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_budget_stops_the_job_and_a_larger_one_finishes_it_paying_nothing_twice(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20)))
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with fault_server() as server:
        teacher = tmp_path / "teacher.yaml"
        teacher.write_text(f"backend: openai\nmodel: m\nbase_url: {server.base_url}\nprice_per_mtok_in: 1000\nprice_per_mtok_out: 1000\n")
        args = ["generate", "--teacher", str(teacher), "--input", str(inp), "--output", str(out), "--max-tokens", "8",
                "--concurrency", "1", "--quiet"]  # fmt: skip
        capped = distill(*args, "--budget-usd", "0.05", cache=cache)
        assert capped.returncode == 1
        assert "stopped on budget: $" in capped.stderr and "of $0.05 spent" in capped.stderr and "Traceback" not in capped.stderr
        sent = server.received
        assert 0 < sent < 20
        # What the server billed: each answer's prompt and completion words, at $1000 per million.
        billed = sum(len(f"question {i}".split()) + len(f"echo: question {i} #c0".split()) for i in range(sent)) * 1000 / 1e6
        assert billed <= 0.05, "never more than the budget"
        records = out.read_text().splitlines()
        rejects = [json.loads(line) for line in out.with_name("out.rejects.jsonl").read_text().splitlines()]
        assert len(records) == sent and len(rejects) == 20 - sent
        assert all(r["reason"].startswith("budget: not sent") and r["error"] and r["retryable"] for r in rejects)

        more = distill(*args, "--budget-usd", "10", cache=cache)
        assert more.returncode == 0, more.stderr
        assert server.received == 20 and server.repaid() == 0, "the rerun sent exactly the inputs the budget held back"
        assert len(out.read_text().splitlines()) == 20


def test_a_budget_needs_prices_and_is_checked_like_a_flag(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with fault_server() as server:
        args = ["generate", "--teacher", f"openai:m@{server.base_url}", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--quiet"]
        no_prices = distill(*args, "--budget-usd", "1", cache=tmp_path / "cache")
        assert no_prices.returncode == 1 and "--budget-usd needs the teacher's prices" in no_prices.stderr
        negative = distill(*args, "--budget-usd", "-1", cache=tmp_path / "cache")
        assert negative.returncode == 1 and "argument --budget-usd: Input should be greater than 0" in negative.stderr
        assert server.received == 0


def test_the_worst_case_covers_the_prompt_and_every_samples_max_tokens():
    request = ChatRequest(messages=[{"role": "user", "content": "x" * 400}], params=SamplingParams(max_tokens=100, n=2))
    # ~100 prompt tokens sent twice at most, 2 x 100 completion tokens: at $1 and $2 per million.
    assert 2 * 100 * 1 / 1e6 + 200 * 2 / 1e6 <= worst_case(request, Prices(1.0, 2.0)) <= 2 * 110 * 1 / 1e6 + 200 * 2 / 1e6
    budget = Budget(1.0)
    assert budget.reserve(0.6) and not budget.reserve(0.5) and budget.refused == 1
    budget.settle(0.6, 0.2)
    assert budget.reserve(0.5) and round(budget.spent, 6) == 0.2


def test_the_estimate_comes_first_and_dry_run_sends_and_writes_nothing(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(6)))
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache"
    with fault_server() as server:
        teacher = tmp_path / "teacher.yaml"
        teacher.write_text(f"backend: openai\nmodel: m\nbase_url: {server.base_url}\nprice_per_mtok_in: 1000\nprice_per_mtok_out: 2000\n")
        args = ["generate", "--teacher", str(teacher), "--input", str(inp), "--output", str(out), "-n", "2", "--max-tokens", "16"]
        dry = distill(*args, "--dry-run", cache=cache)
        assert dry.returncode == 0 and "dry run: nothing was sent" in dry.stdout
        assert "estimate for generate: 12 samples to ask for (0 in the cache)" in dry.stderr
        assert "at most 192 completion tokens" in dry.stderr  # 12 samples x max_tokens 16
        bound = float(dry.stderr.split("at most $")[1].split()[0])
        assert server.received == 0 and not out.exists() and not out.with_name("out.jsonl.partial").exists()
        real = distill(*args, cache=cache)
        assert real.returncode == 0, real.stderr
        assert real.stderr.index("estimate for generate") < real.stderr.index("generate 6/6 tasks"), "before the first request"
        paid = float(real.stdout.split(", $")[1].split()[0])
        assert 0 < paid <= bound, "the bound is never below what was paid"
        again = distill(*args, "--dry-run", cache=cache)
        assert "0 samples to ask for (12 in the cache)" in again.stderr and "at most $0.0000" in again.stderr

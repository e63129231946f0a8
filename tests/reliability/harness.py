"""`distill generate` killed and resumed, and run against a faulty teacher: shared by the tests and the benchmark.

Everything is real: `distill` runs as a subprocess, the teacher is tests/fault_server.py
on a local port, kills are real signals. The server counts every good answer per
distinct sample, so "paid twice" is something it saw, not something we infer.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fault_server import FaultServer

ROOT = Path(__file__).resolve().parents[2]


def cli_env(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `distill` child: its own response cache, one thread, no hub."""
    return {
        **os.environ, "BBD_RESPONSE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra or {}),
    }


def run_cli(*args: str, cache: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `distill ARGS` to the end."""
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=cli_env(cache, env), timeout=timeout, cwd=ROOT
    )


def write_prompts(path: Path, count: int) -> Path:
    """`count` distinct prompts of varied length (so journal lines differ in size)."""
    with path.open("w") as fh:
        for i in range(count):
            fh.write(json.dumps({"prompt": f"question {i}: " + "why " * (i % 7)}) + "\n")
    return path


@dataclass
class OutputCheck:
    """What a finished output file holds, and what is wrong with it."""

    records: dict[str, dict]
    duplicates: int = 0
    truncated: int = 0


def check_output(path: Path) -> OutputCheck:
    """Read a JSON Lines output strictly: count cut or unparsable lines and repeated ids."""
    raw = path.read_bytes()
    check = OutputCheck(records={})
    if raw and not raw.endswith(b"\n"):
        check.truncated += 1
    for line in raw.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            check.truncated += 1
            continue
        if row["id"] in check.records:
            check.duplicates += 1
        check.records[row["id"]] = row
    return check


def cached_texts(cache: Path) -> set[str]:
    """The text of every sample in a response cache (the echo server's answers are unique per sample)."""
    db = cache / "responses.sqlite"
    if not db.exists():
        return set()
    con = sqlite3.connect(db, timeout=30)
    try:
        return {json.loads(c)["text"] for (c,) in con.execute("SELECT completion FROM samples")}
    finally:
        con.close()


@dataclass
class KillReport:
    """What a job killed again and again went through, and what it ended with."""

    kills: int = 0
    survived: int = 0
    lost: int = 0
    changed: int = 0
    extra: int = 0
    duplicates: int = 0
    truncated: int = 0
    repaid: int = 0
    in_flight_lost: int = 0
    max_in_flight_lost: int = 0
    graceful_lost: int = 0
    repaid_after_cached: int = 0
    records: int = 0
    return_codes: list[int] = field(default_factory=list)
    seconds: float = 0.0


class _Ledger:
    """Tells answers lost in flight at a kill (never reached the cache) from answers paid twice after caching."""

    def __init__(self, server: FaultServer, cache: Path):
        self.server, self.cache = server, cache
        self.explained: dict[str, int] = {}
        self.when_cached: dict[str, int] = {}

    def after_kill(self) -> int:
        """Account for the answers the dead process had received; returns how many never reached the cache."""
        cached = cached_texts(self.cache)
        answered, texts = self.server.answered(), self.server.answer_texts()
        lost = 0
        for key, count in answered.items():
            if texts[key] in cached:
                self.when_cached.setdefault(key, count)
            else:
                lost += count - self.explained.get(key, 0)
                self.explained[key] = count
        return lost

    def paid_after_cached(self) -> int:
        """Answers sent for samples that were already in the cache at some kill."""
        answered = self.server.answered()
        return sum(answered[k] - n for k, n in self.when_cached.items())


def _wait_and_kill(proc: subprocess.Popen, journal: Path, sig: int, rng: random.Random, expected_bytes: int, kills_left: int) -> bool:
    """Send `sig` at a random moment of the run; False when the run ended first."""
    if sig == signal.SIGKILL and rng.random() < 0.25:
        # Sometimes during start-up, validation or cache opening, not only mid-job (Ctrl-C and
        # SIGTERM are aimed mid-job, where waiting for the requests in flight matters).
        deadline, target = time.monotonic() + rng.uniform(0.05, 0.6), None
    else:
        done = journal.stat().st_size if journal.exists() else 0
        remaining = max(expected_bytes - done, 1)
        target = done + min(0.9 * remaining, rng.uniform(0, 2 * remaining / (kills_left + 1)))
        deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if target is not None and journal.exists() and journal.stat().st_size >= target:
            break
        time.sleep(0.003)
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    return True


def kill_and_resume(
    server: FaultServer, work: Path, *, count: int, signals: list[int], concurrency: int = 8, seed: int = 0
) -> KillReport:
    """Run a job of `count` requests, killing it with each of `signals` in turn, then let it finish.

    The final output is compared with an uninterrupted run's (made first, on its own cache;
    the server's counters are reset after it).
    """
    rng = random.Random(seed)
    prompts = write_prompts(work / "in.jsonl", count)
    out, cache = work / "out.jsonl", work / "cache"
    common = ["generate", "--input", str(prompts), "--seed", "11", "--concurrency", str(concurrency), "--quiet"]
    teacher = ["--teacher", f"openai:echo@{server.base_url}"]
    ref = run_cli(*common, *teacher, "--output", str(work / "ref.jsonl"), cache=work / "ref-cache")
    assert ref.returncode == 0, ref.stderr
    reference = check_output(work / "ref.jsonl").records
    # A journal line is the record plus a small envelope: enough to aim kills at a fraction of the work.
    expected_bytes = (work / "ref.jsonl").stat().st_size + 60 * count
    server.reset()

    report, ledger = KillReport(), _Ledger(server, cache)
    started = time.monotonic()
    args = [sys.executable, "-m", "distill", *common, *teacher, "--output", str(out)]
    journal = out.with_name(out.name + ".partial")
    for i, sig in enumerate(signals):
        proc = subprocess.Popen(args, env=cli_env(cache), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        killed = _wait_and_kill(proc, journal, sig, rng, expected_bytes, len(signals) - i)
        _, err = proc.communicate(timeout=60)
        report.return_codes.append(proc.returncode)
        if not killed:
            break  # it finished first: nothing left to interrupt
        report.kills += 1
        assert proc.returncode != 0, f"killed run exited 0: {err.decode()[-500:]}"
        if out.exists():
            # Killed while finalizing: what is there must be whole (renamed into place, never written in place).
            assert check_output(out).truncated == 0
        server.wait_idle()  # what the dead client had sent reaches the server and is counted
        lost = ledger.after_kill()
        report.in_flight_lost += lost
        report.max_in_flight_lost = max(report.max_in_flight_lost, lost)
        if sig != signal.SIGKILL:
            report.graceful_lost += lost

    final = run_cli(*common, *teacher, "--output", str(out), cache=cache)
    assert final.returncode == 0, final.stderr
    report.seconds = time.monotonic() - started
    result = check_output(out)
    report.survived = report.kills
    report.records = len(result.records)
    report.duplicates, report.truncated = result.duplicates, result.truncated
    report.lost = len(set(reference) - set(result.records))
    report.extra = len(set(result.records) - set(reference))
    report.changed = sum(1 for k, v in result.records.items() if k in reference and reference[k] != v)
    report.repaid = server.repaid()
    report.repaid_after_cached = ledger.paid_after_cached()
    return report


#: `KEY 123` fields of the progress line.
_FIELD = re.compile(r"(retries|rejects|records) (\d+)")


@dataclass
class FaultReport:
    """A job against a teacher that fails a share of its requests."""

    inputs: int = 0
    records: int = 0
    rejects: int = 0
    unaccounted: int = 0
    accounted_twice: int = 0
    reasons_missing: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    received: int = 0
    retries: int = 0
    max_tries: int = 0
    progress: dict[str, int] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    stdout: str = ""


def teacher_file(path: Path, base_url: str, *, max_retries: int, timeout: float, concurrency: int) -> Path:
    """A teacher YAML with short timeouts and backoff, so a faulty run stays quick."""
    path.write_text(
        f"backend: openai\nmodel: echo\nbase_url: {base_url}\nmax_retries: {max_retries}\ntimeout: {timeout}\n"
        f"backoff_base: 0.02\nbackoff_max: 0.2\nconcurrency: {concurrency}\n"
    )
    return path


def faulty_run(server: FaultServer, work: Path, *, count: int, max_retries: int = 3, timeout: float = 1.0, concurrency: int = 32) -> FaultReport:
    """Run a job of `count` requests against `server` (its fault settings as given) and account for every input."""
    prompts = write_prompts(work / "in.jsonl", count)
    out = work / "out.jsonl"
    teacher = teacher_file(work / "teacher.yaml", server.base_url, max_retries=max_retries, timeout=timeout, concurrency=concurrency)
    started = time.monotonic()
    result = run_cli("generate", "--teacher", str(teacher), "--input", str(prompts), "--output", str(out), "--seed", "3", cache=work / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    report = FaultReport(inputs=count, seconds=time.monotonic() - started, stdout=result.stdout)
    wanted = {json.loads(line)["prompt"] for line in prompts.read_text().splitlines()}
    seen: dict[str, int] = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        report.records += 1
        prompt = rec["messages"][0]["content"] if "messages" in rec else rec["prompt"][0]["content"]
        seen[prompt] = seen.get(prompt, 0) + 1
    for line in out.with_name("out.rejects.jsonl").read_text().splitlines():
        rej = json.loads(line)
        report.rejects += 1
        seen[rej["input"]["prompt"]] = seen.get(rej["input"]["prompt"], 0) + 1
        reason = (rej.get("reason") or "").strip()
        report.reasons_missing += not reason
        key = re.sub(r"\d+\.\d+", "N", reason)[:60]
        report.reject_reasons[key] = report.reject_reasons.get(key, 0) + 1
    report.unaccounted = len(wanted - set(seen))
    report.accounted_twice = sum(1 for c in seen.values() if c > 1)
    report.faults = server.faults()
    report.received = server.received
    tries = server.tries()
    report.max_tries = max(tries.values(), default=0)
    summary = re.search(r"(\d+) retries", result.stdout)
    report.retries = int(summary.group(1)) if summary else -1
    last = [ln for ln in result.stderr.splitlines() if " tasks | " in ln]
    report.progress = {k: int(v) for k, v in _FIELD.findall(last[-1])} if last else {}
    return report


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}

"""Reliability at full size: a synthesis job killed 22 times, and one against a teacher failing 30 % of requests.

Both talk to tests/fault_server.py on a local port and run `distill generate` as a child
process, exactly as tests/reliability/ does at a smaller size. Run by hand:

    .venv/bin/python benchmarks/reliability.py [--requests 3000] [--kills 20] [--latency 0.02]

Targets: every kill survived, 0 records lost, 0 duplicated, 0 samples re-paid once cached;
with faults, every input a record or a reject with a reason and no request over its retry budget.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault_server import FaultServer  # noqa: E402
from tests.reliability.harness import faulty_run, kill_and_resume  # noqa: E402


def kills(args: argparse.Namespace) -> None:
    """Kill a job `--kills` times with SIGKILL, plus once with SIGINT and once with SIGTERM, then let it finish."""
    signals = [signal.SIGKILL] * args.kills + [signal.SIGINT, signal.SIGTERM]
    random.Random(args.seed).shuffle(signals)
    with FaultServer(latency=args.latency) as server, tempfile.TemporaryDirectory() as work:
        r = kill_and_resume(server, Path(work), count=args.requests, signals=signals, concurrency=args.concurrency, seed=args.seed)
    print(f"kill-and-resume: {args.requests} requests, concurrency {args.concurrency}, {args.latency * 1000:.0f} ms latency, {r.seconds:.0f} s")
    print(f"  kills survived:        {r.survived}/{len(signals)} (SIGKILL x{args.kills}, SIGINT, SIGTERM)")
    print(f"  records:               {r.records} (uninterrupted run: {args.requests})")
    print(f"  records lost:          {r.lost}   changed: {r.changed}   extra: {r.extra}")
    print(f"  duplicates:            {r.duplicates}   truncated lines: {r.truncated}")
    print(f"  re-paid once cached:   {r.repaid_after_cached}")
    print(f"  re-paid in all:        {r.repaid} (answers the server sent while a SIGKILL landed, never read; at most {r.max_in_flight_lost} per kill)")
    print(f"  lost in flight on Ctrl-C/SIGTERM: {r.graceful_lost}")


def faults(args: argparse.Namespace) -> None:
    """A job against a teacher failing 30 % of requests with every transient fault kind."""
    with FaultServer(fault_rate=0.3, stall_s=3.0, retry_after=0.05, fault_seed=args.seed) as server, tempfile.TemporaryDirectory() as work:
        r = faulty_run(server, Path(work), count=args.requests, max_retries=args.max_retries, timeout=0.5, concurrency=64)
    injected = sum(r.faults.values())
    print(f"faulty teacher: {args.requests} requests, 30 % faults, max_retries {args.max_retries}, {r.seconds:.0f} s")
    print(f"  faults injected:       {injected} ({', '.join(f'{k} {v}' for k, v in sorted(r.faults.items()))})")
    print(f"  requests received:     {r.received}; retries {r.retries} (progress line: retries {r.progress.get('retries')}, rejects {r.progress.get('rejects')})")
    print(f"  most tries of one request: {r.max_tries} (budget {1 + args.max_retries})")
    print(f"  records {r.records} + rejects {r.rejects} = {r.records + r.rejects}; unaccounted {r.unaccounted}; twice {r.accounted_twice}; "
          f"rejects without a reason {r.reasons_missing}")
    print(f"  faults injected vs rejects: {injected} vs {r.rejects}")
    for reason, n in sorted(r.reject_reasons.items(), key=lambda kv: -kv[1]):
        print(f"    {n:5d}  {reason}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs (one SIGINT and one SIGTERM are added)")
    p.add_argument("--latency", type=float, default=0.02, help="seconds the server takes per answer")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    kills(args)
    faults(args)


if __name__ == "__main__":
    main()

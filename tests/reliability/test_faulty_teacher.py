"""A teacher failing 30 % of requests (every transient fault kind): the job completes and accounts for every input.

A small version of benchmarks/reliability.py's fault run.
"""

from __future__ import annotations

from tests.fault_server import TRANSIENT_FAULTS, FaultServer
from tests.reliability.harness import faulty_run, run_cli

MAX_RETRIES = 1  # 0.3² = 9 % of inputs end as rejects: enough that some always do


def test_thirty_percent_faults_every_input_ends_as_record_or_reject_within_the_retry_budget(tmp_path):
    with FaultServer(fault_rate=0.3, stall_s=3.0, retry_after=0.05, fault_seed=7) as server:
        report = faulty_run(server, tmp_path, count=300, max_retries=MAX_RETRIES, timeout=0.5)
        assert set(report.faults) == set(TRANSIENT_FAULTS), f"every fault kind was injected: {report.faults}"
        assert sum(report.faults.values()) >= 60

        assert report.records + report.rejects == 300 and report.rejects > 0, report
        assert report.unaccounted == 0 and report.accounted_twice == 0, "every input is a record or a reject, once"
        assert report.reasons_missing == 0, report.reject_reasons

        assert report.max_tries <= 1 + MAX_RETRIES, "no request is tried more than the budget allows"
        assert report.retries == report.received - 300, "every retry the server saw is counted, and only those"
        assert report.progress.get("retries") == report.retries and report.progress.get("rejects") == report.rejects, report.progress
        assert f"{report.rejects} inputs failed at the teacher" in report.stdout

        # The faults are over: a rerun asks again for the rejected inputs only.
        server.fault_rate = 0.0
        before = server.received
        teacher = str(tmp_path / "teacher.yaml")
        again = run_cli("generate", "--teacher", teacher, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                        "--seed", "3", "--quiet", cache=tmp_path / "cache")
        assert again.returncode == 0, again.stderr
        assert server.received - before == report.rejects
    assert "wrote 300 records" in again.stdout and (tmp_path / "out.rejects.jsonl").read_text() == ""

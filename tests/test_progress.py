"""The progress line in a log: one line per tenth of the tasks and every N seconds, not one per second."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from synth.progress import JobCounts, ProgressLine, log_interval
from synth.teachers.base import Prices, TeacherStats


def fake_teacher():
    return SimpleNamespace(stats=TeacherStats(), cache_stats=SimpleNamespace(hits=0), prices=Prices(1.0, 2.0))


def test_a_log_gets_a_line_per_tenth_and_a_final_one(capsys):
    teacher, counts = fake_teacher(), JobCounts(total=50)

    async def job():
        async with ProgressLine("label", teacher, counts, log_every=3600):
            for _ in range(50):
                counts.done += 1
                teacher.stats.requests_sent += 1
                teacher.stats.prompt_tokens += 10
                await asyncio.sleep(0.02)  # the job's own pace; the line is checked every 0.5 s

    asyncio.run(job())
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("label ")]
    assert 2 <= len(lines) <= 11, lines  # a line per tenth reached between checks, and the final one; never one per task
    assert lines[-1].startswith("label 50/50 tasks") and lines[-1].endswith("$0.0005")  # 500 prompt tokens at $1/M
    firsts = [int(ln.split()[1].split("/")[0]) for ln in lines[:-1]]
    assert firsts == sorted(firsts) and all(n < 50 for n in firsts)


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("BBD_PROGRESS_SECONDS", "5")
    assert log_interval() == 5
    monkeypatch.setenv("BBD_PROGRESS_SECONDS", "soon")
    assert log_interval() == 30
    monkeypatch.delenv("BBD_PROGRESS_SECONDS")
    assert log_interval() == 30

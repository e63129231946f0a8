"""`kill -9` in a later stage of every multi-stage synthesis command, then the same command again.

Each command that keeps stage files in `OUT.work/` (label with one and two teachers, expand
self-instruct, expand evol, curate, feedback in rate mode with a two-judge panel and in pairwise
mode, self) runs three times against tests/fault_server.py, everything real (subprocesses,
HTTP, signals):

1. uninterrupted, on its own cache: the reference output;
2. on a fresh cache, SIGKILLed mid-stage, once the stage's journal (`OUT.work/<stage>.jsonl.partial`,
   or `OUT.partial` for a last stage that writes the output itself) holds a few finished tasks: a
   condition, not a sleep. The stage is a later one (all but label with one teacher, whose only
   requesting stage is its first), so the earlier stages' files must be read back, not asked again;
3. the same command again, to the end.

Asserted: the rerun exits 0; every file it leaves (output, rejects, `.pairs.jsonl`, coverage,
tree, and each stage file in `OUT.work/`) holds the same rows as the reference's (parsed JSON,
compared sorted, every field: no record carries a time, and both runs write the same path);
no journal or lock is left; and, from the server's own counts, the rerun asked for exactly the
samples that were not in the cache at the kill (read from the cache right after it), and the
only samples answered twice over both runs are those the kill lost in flight (answered by the
server, never stored: at most concurrency x n).

The echo server answers "echo: <last user message> #<seed>"; where a stage needs structured
answers, `replies` (fixed texts picked by a substring of the prompt) or templates whose echo is
the JSON make them parse, the same ways tests/test_expand.py, test_curate.py and test_label.py
do. A sample's seed is its request's hash + its index, so the last digit of the echo tells the
samples of one request apart: the judges below rate by that digit, so scores differ and pairs form.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from synth.teachers.cache import ResponseCache
from tests.fault_server import FaultServer
from tests.reliability.harness import ROOT, cli_env, run_cli, teacher_file

LATENCY = 0.03
CONCURRENCY = 2


# -- inputs and the replies that make each stage's answers parse --------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


#: Short instructions with no words in common, so their "Explain to a beginner: ..." copies are no near-duplicates.
TASKS = [
    "Name famous rivers of Africa.", "Why do volcanoes erupt?", "Describe ocean tides briefly.", "Where do comets come from?",
    "How are glaciers moving?", "List animals living in deserts.", "Compare tropical and boreal forests.", "What causes earthquakes underground?",
    "Classify common cloud types.", "Protect coral reefs from bleaching.", "How do fridge magnets stick?", "Recycle old phone batteries safely.",
    "Design a small wooden bridge.", "Why are bees important pollinators?", "Do whales sleep at night?", "Explain why rainbows look curved.",
    "Why does Earth have seasons?", "Predict the next solar eclipse.", "How old are dinosaur fossils?", "Survive a tornado at home.",
]  # fmt: skip

#: A Self-Instruct request whose echo is a valid list of new instructions (as in tests/test_expand.py).
PROPOSE = (
    '{"instructions": [{% for d in demos %}{"instruction": {{ ("Explain to a beginner: " ~ d.instruction) | tojson }}}'
    "{% if not loop.last %}, {% endif %}{% endfor %}]}"
)

#: What ends a rating request (feedback/rate and self/reward), right after the response rated.
RATE_END = "\n\nReply with only a JSON object with one key"


def rating(score: int) -> str:
    return json.dumps({a: {"rating": score, "rationale": "as planted"} for a in ("helpfulness", "honesty")})


def judge_replies() -> dict[str, str]:
    """Ratings and verdicts by the last digit of the response's seed; a 'tie-me' prompt rates all alike, 'junk-me' gets no JSON."""
    replies = {
        "tie-me\n\n[Response]": rating(5), "tie-me\n\n[Answer]": rating(5),
        "junk-me\n\n[Response]": "no JSON here", "junk-me\n\n[Answer]": "no JSON here",
        "tie-me\n\n[Response A]": json.dumps({"winner": "tie", "reason": "alike"}),
        "junk-me\n\n[Response A]": "no JSON here",
    }  # fmt: skip
    for d in range(10):
        replies[f"{d}{RATE_END}"] = rating(d + 1)
        # Consecutive seeds: one even, one odd. The even one wins in both orders (a consistent verdict).
        replies[f"{d}\n\n[Response B]"] = json.dumps({"winner": "A" if d % 2 == 0 else "B", "reason": "parity"})
    return replies


def judged_prompts(tmp: Path, count: int) -> Path:
    kinds = ["", " tie-me", " junk-me", "", ""]
    return write_jsonl(tmp / "in.jsonl", [{"prompt": f"Question {i}:{kinds[i % len(kinds)]}"} for i in range(count)])


CURATE_TREE = {"Oceanography": ["Waves", "Currents"], "Waves": ["Tsunamis", "Swell"], "Currents": ["Gulf Stream", "Upwelling"]}
TASK_TYPES, LEVELS = ["quiz", "essay"], ["easy", "hard"]


def curate_replies() -> dict[str, str]:
    """Subtopics per topic; per cell two questions, the second shared by the cells of a leaf (so dedup has work)."""
    replies = {f'subtopics of "{k}"': json.dumps({"subtopics": v}) for k, v in CURATE_TREE.items()}
    for parent in CURATE_TREE["Oceanography"]:
        for leaf in CURATE_TREE[parent]:
            for task in TASK_TYPES:
                for level in LEVELS:
                    cell = f"Topic: Oceanography > {parent} > {leaf}\n- Task type: {task}\n- Difficulty: {level}"
                    replies[cell] = json.dumps({"questions": [f"{level.title()} {task} on {leaf}: what drives it?", f"Name one fact about {leaf}."]})
    return replies


# -- the commands --------------------------------------------------------------------------------
Args = Callable[[Path, Path, list[FaultServer]], list[str]]


@dataclass
class Case:
    name: str
    #: FaultServer settings, one server each (teachers that send the same prompts need their own server,
    #: or the server would count two teachers' answers to one prompt as one sample paid twice).
    servers: list[dict]
    #: (folder for inputs, output path, servers) -> the command's arguments.
    args: Args
    #: The journal, relative to the output's folder, whose finished tasks trigger the kill (a glob).
    journal: str
    #: Finished tasks in that journal at the kill.
    tasks: int
    #: The most samples one teacher has in flight: concurrency x n.
    flight: int
    #: Stage files (globs) the killed run had finished: read back by the rerun, not asked for again.
    done: tuple[str, ...] = ()


def label_args(tmp: Path, out: Path, servers: list[FaultServer]) -> list[str]:
    # Every other input has a reference answer (some agree with the stated one, most do not): verified and voted inputs both.
    rows = [{"question": f"Q{i}\nAnswer: {i % 5}\nend", **({"answer": f"#### {i % 3}"} if i % 2 else {})} for i in range(20)]
    teachers = [a for i, s in enumerate(servers) for a in ("--teacher", f"openai:t{i}@{s.base_url}")]
    return ["label", *teachers, "--input", str(write_jsonl(tmp / "in.jsonl", rows)), "--output", str(out), "-n", "2",
            "--concurrency", str(CONCURRENCY), "--quiet"]  # fmt: skip


def self_instruct_args(tmp: Path, out: Path, servers: list[FaultServer]) -> list[str]:
    seeds = write_jsonl(tmp / "seeds.jsonl", [{"id": f"s{i}", "instruction": t} for i, t in enumerate(TASKS)])
    (tmp / "propose.jinja").write_text(PROPOSE)
    return ["expand", "self-instruct", "--seeds", str(seeds), "--template", str(tmp / "propose.jinja"), "--output", str(out),
            "--target", "30", "--max-rounds", "4", "--requests-per-round", "4", "--demos", "4", "--machine-demos", "1",
            "--per-request", "4", "--teacher", f"openai:echo@{servers[0].base_url}", "--concurrency", str(CONCURRENCY), "--quiet"]  # fmt: skip


def evol_args(tmp: Path, out: Path, servers: list[FaultServer]) -> list[str]:
    pool = write_jsonl(tmp / "pool.jsonl", [{"id": f"p{i}", "instruction": t} for i, t in enumerate(TASKS[:12])])
    # deepen's echo adds words (kept, judged, answered, evolved again); breadth's copies the prompt (eliminated).
    (tmp / "deepen.jinja").write_text("Rewrite with more depth: {{ prompt }} Justify every claim with evidence.")
    (tmp / "breadth.jinja").write_text("#Created Prompt#: {{ prompt }}")
    config = tmp / "evol.yaml"
    config.write_text(json.dumps({"templates": {"deepen": str(tmp / "deepen.jinja"), "breadth": str(tmp / "breadth.jinja")}}))
    return ["expand", "evol", "--config", str(config), "--input", str(pool), "--output", str(out), "--rounds", "2",
            "--operations", "deepen", "breadth", "--info-gain", "teacher", "--judge-max-tokens", "300", "--min-answer-words", "2",
            "--teacher", f"openai:echo@{servers[0].base_url}", "--concurrency", str(CONCURRENCY), "--quiet"]  # fmt: skip


def curate_args(tmp: Path, out: Path, servers: list[FaultServer]) -> list[str]:
    return ["curate", "--root-topic", "Oceanography", "--depth", "2", "--breadth", "2", "--task-types", *TASK_TYPES,
            "--difficulties", *LEVELS, "--per-cell", "2", "--output", str(out), "--teacher", f"openai:echo@{servers[0].base_url}",
            "--concurrency", str(CONCURRENCY), "--quiet"]  # fmt: skip


def feedback_args(mode: str) -> Args:
    def args(tmp: Path, out: Path, servers: list[FaultServer]) -> list[str]:
        judges = [a for i, s in enumerate(servers) for a in ("--judge", f"openai:judge{i}@{s.base_url}")]
        return ["feedback", "--mode", mode, "--input", str(judged_prompts(tmp, 12)), "--output", str(out),
                "--student", f"openai:student@{servers[0].base_url}", *judges, "--aspects", "helpfulness", "honesty",
                "--concurrency", str(CONCURRENCY), "--quiet"]  # fmt: skip

    return args


def self_args(tmp: Path, out: Path, servers: list[FaultServer]) -> list[str]:
    # `distill self` has no --concurrency: the student is a teacher file that sets it.
    student = teacher_file(tmp / "student.yaml", servers[0].base_url, max_retries=2, timeout=30, concurrency=CONCURRENCY)
    return ["self", "--input", str(judged_prompts(tmp, 12)), "--output", str(out), "--student", str(student), "--samples", "3",
            "--aspects", "helpfulness", "honesty", "--refine", "--quiet"]  # fmt: skip


ECHO = {"latency": LATENCY}
#: Refusing both JSON response formats makes the client prompt for JSON, so an echo of a JSON-shaped prompt parses.
PROMPTED_JSON = {"latency": LATENCY, "json_schema": False, "json_object": False}
JUDGE = {"latency": LATENCY, "replies": judge_replies()}

CASES = [
    # One teacher: killed in its sampling stage; the vote then needs every sample of it.
    Case("label", [ECHO], label_args, "out.work/samples-0.jsonl.partial", 6, CONCURRENCY * 2),
    # Two teachers: killed while the second samples; the first's finished stage is read back, not asked again.
    Case("label-2-teachers", [ECHO, ECHO], label_args, "out.work/samples-1.jsonl.partial", 4, CONCURRENCY * 2, ("out.work/samples-0.jsonl",)),
    # Killed while answering: four rounds of pool growth (filters, dedup) are rebuilt from their stage files.
    Case("expand-self-instruct", [PROMPTED_JSON], self_instruct_args, "out.jsonl.partial", 4, CONCURRENCY,
         ("out.work/round-[1234].jsonl", "out.work/instructions.jsonl")),
    # Killed in round 2's evolve stage: round 1's evolve, judge and answer stages are read back.
    Case("expand-evol", [PROMPTED_JSON], evol_args, "out.work/round-2-evolve.jsonl.partial", 3, CONCURRENCY,
         ("out.work/round-1-evolve.jsonl", "out.work/round-1-judge.jsonl", "out.work/round-1-answer.jsonl")),
    # Killed while answering: the grown tree (two levels) and the questions stage (with dedup) are read back.
    Case("curate", [{**ECHO, "replies": curate_replies()}], curate_args, "out.jsonl.partial", 5, CONCURRENCY,
         ("out.work/tree-1.jsonl", "out.work/tree-2.jsonl", "out.tree.yaml", "out.work/questions.jsonl")),
    # A panel of two judges: killed while the second judges; candidates and the first judge's ratings are read back.
    Case("feedback-rate-panel", [JUDGE, JUDGE], feedback_args("rate"), "out.work/rate-judge2-*.jsonl.partial", 4, CONCURRENCY * 2,
         ("out.work/candidates-student.jsonl", "out.work/rate-judge1-*[0-9a-f].jsonl")),
    Case("feedback-pairwise", [JUDGE], feedback_args("pairwise"), "out.work/pairwise-judge1-*.jsonl.partial", 4, CONCURRENCY * 2,
         ("out.work/candidates-student.jsonl",)),
    # Killed in the critique stage: samples and self-reward ratings are read back, then critique and refine.
    Case("self", [JUDGE], self_args, "out.work/self-critique.jsonl.partial", 3, CONCURRENCY * 3,
         ("out.work/samples.jsonl", "out.work/self-reward.jsonl")),
]


# -- what the runs left, and what the server saw ---------------------------------------------
def samples_cached(cache: Path) -> int:
    store = ResponseCache(cache)
    try:
        return store.count()
    finally:
        store.close()


def answered(servers: list[FaultServer]) -> int:
    """Samples the servers sent a good answer for, counting every answer (a sample answered twice counts twice)."""
    return sum(sum(s.answered().values()) for s in servers)


def repaid(servers: list[FaultServer]) -> int:
    return sum(s.repaid() for s in servers)


def snapshot(folder: Path) -> dict[str, object]:
    """Every file under `folder` by relative path: JSON Lines as their rows (sorted), JSON parsed, other text as is."""
    found: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        text = path.read_text(encoding="utf-8")
        if name.endswith(".jsonl"):
            found[name] = sorted(json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False) for line in text.splitlines() if line.strip())
        elif name.endswith(".json"):
            found[name] = json.loads(text)
        else:
            found[name] = text
    return found


def kill_when_journaled(proc: subprocess.Popen, folder: Path, pattern: str, tasks: int) -> None:
    """SIGKILL `proc` once a journal matching `pattern` under `folder` holds its header and `tasks` finished tasks."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before {pattern} had {tasks} tasks: nothing to resume")
        for journal in folder.glob(pattern):
            try:
                if journal.read_bytes().count(b"\n") >= 1 + tasks:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
            except FileNotFoundError:
                pass  # finalized between the glob and the read
        time.sleep(0.003)
    proc.kill()
    proc.wait()
    pytest.fail(f"{pattern} never had {tasks} tasks")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_killed_in_a_later_stage_the_rerun_ends_as_an_uninterrupted_run_and_pays_only_what_was_lost(tmp_path, case):
    servers = [FaultServer(**kw).start() for kw in case.servers]
    try:
        folder = tmp_path / "o"
        out = folder / "out.jsonl"
        args = case.args(tmp_path, out, servers)

        ref = run_cli(*args, cache=tmp_path / "ref-cache")
        assert ref.returncode == 0, ref.stderr[-3000:]
        total = samples_cached(tmp_path / "ref-cache")
        assert answered(servers) == total > 0 and repaid(servers) == 0, "an uninterrupted run asks for every sample once"
        # The same output path for both runs (so nothing that names it differs): the reference moves aside.
        folder.rename(tmp_path / "ref")
        for s in servers:
            s.reset()

        cache = tmp_path / "cache"
        proc = subprocess.Popen([sys.executable, "-m", "distill", *args], env=cli_env(cache), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        kill_when_journaled(proc, folder, case.journal, case.tasks)
        assert proc.returncode == -signal.SIGKILL
        for s in servers:
            s.wait_idle()  # what the dead client had sent reaches the server and is counted
        assert not out.exists(), "a killed run leaves no output, only its stage files and journals"
        for pattern in case.done:
            assert len(list(folder.glob(pattern))) == len(list((tmp_path / "ref").glob(pattern))) > 0, f"killed before {pattern} was done"
        stored = samples_cached(cache)
        paid = answered(servers)
        lost = paid - stored  # answered, never stored: what was in flight at the kill
        assert 0 <= lost <= case.flight, (paid, stored)
        assert 0 < stored < total

        rerun = run_cli(*args, cache=cache)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert answered(servers) - paid == total - stored, "the rerun asks for exactly the samples not in the cache"
        assert repaid(servers) == lost, "the only samples paid twice are those the kill lost in flight"

        left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith((".partial", ".recover", ".lock")))
        assert left == [], "a finished run leaves no journal or lock"
        ours, reference = snapshot(folder), snapshot(tmp_path / "ref")
        assert sorted(ours) == sorted(reference), "the same files"
        for name in reference:
            assert ours[name] == reference[name], f"{name} differs from the uninterrupted run's"
    finally:
        for s in servers:
            s.stop()

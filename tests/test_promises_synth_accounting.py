"""README promises about what every synth command asks a teacher and what it costs, end to end.

Every run is a real `distill` process talking to tests/fault_server.py over HTTP, through a
teacher YAML file with prices (1000 and 2000 per million tokens, so a few hundred tokens show in
the summary's four decimals). The server's `replies` turn each pipeline's structured request into
a parseable answer (an instruction list, an evolved prompt, questions, ratings, a CoT answer), so
every stage of every pipeline has work to do; everything else is the echo.

- the summary line of every synth command states what the teacher billed (the server's own usage
  totals) and its cost at the file's prices; a multi-stage command's per-stage progress lines add up
  to it (each counts its own stage, not a running total);
- `--no-cache` neither reads nor writes the response cache, for every synth command;
- `--refresh` asks again and overwrites the cache, and a plain rerun then serves the new answers;
- HTTP 408 is retried;
- the evol judge's "Equal" eliminates the evolution it judged.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from synth.teachers.cache import ResponseCache
from tests.fault_server import FaultServer

ROOT = Path(__file__).resolve().parents[1]
PRICES = {"m": (1000.0, 2000.0), "m2": (3000.0, 5000.0)}


def rating(score: int) -> str:
    return json.dumps({"helpfulness": {"rating": score, "rationale": "Judged by the test."}})


EVOLVED = {
    "Name a red fruit.": "Name a red fruit that grows in cold climates and explain why it tolerates frost.",
    "Explain what rain is.": "Explain what rain is, how clouds make it, and why some clouds never bring any.",
}

#: Prompt substring -> the answer text (the first substring found wins, so the judge's keys come first:
#: its prompt also holds the original instruction).
REPLIES = {
    # expand evol --info-gain teacher: the judge (template expand/equal) compares the original with the evolution.
    f"The Second Prompt:\n{EVOLVED['Name a red fruit.']}": "Equal",
    f"The Second Prompt:\n{EVOLVED['Explain what rain is.']}": "Not Equal",
    # expand evol: the deepen template quotes the instruction it evolves.
    **{f"#The Given Prompt#:\n{k}": json.dumps({"instruction": v}) for k, v in EVOLVED.items()},
    # expand self-instruct: the proposal template.
    "new, diverse task instructions": json.dumps({"instructions": [{"instruction": "Name three rivers that flow through Africa.", "input": ""},
                                                                    {"instruction": "Explain how a rainbow forms after a storm.", "input": ""}]}),
    # curate: one question per cell of the test taxonomy.
    "- Topic: Algebra": json.dumps({"questions": ["Solve 2x = 6 for x."]}),
    "- Topic: Probability": json.dumps({"questions": ["What is the chance of heads on a fair coin?"]}),
    # label: a CoT answer per problem.
    "Problem: What is 2 + 3?": "2 + 3 = 5.\nAnswer: 5",
    "Problem: What is 1 + 1?": "1 + 1 = 2.\nAnswer: 2",
    # feedback --mode rate: a rating per response (the teacher's own candidates are echoes).
    "[Response]\nIt is 5.": rating(9),
    "[Response]\nIt is 6.": rating(2),
    "[Response]\nRed.": rating(8),
    "[Response]\nBanana.": rating(1),
    "[Response]\necho: ": rating(5),
    # self: the student rates its own (echoed) answers.
    "[Answer]\necho: ": rating(7),
}

SUMMARY = re.compile(
    r"^(?P<who>teachers?(?: [^:]+)?): (?P<sent>\d+) requests sent, (?P<hits>\d+) samples from cache, (?P<retries>\d+) retries, "
    r"(?P<prompt>[\d,]+) prompt \+ (?P<completion>[\d,]+) completion tokens(?: \([\d,]+ of them reasoning\))?, "
    r"\$(?P<cost>\d+\.\d{4}) in [\d.]+ s",
    re.MULTILINE,
)
PROGRESS = re.compile(r"^(?P<label>.+?) \d+(?:/\d+)? tasks \| [\d.]+ req/s \| (?P<tok>[\d,]+) tok .*\| \$(?P<cost>\d+\.\d{4})$", re.MULTILINE)


def distill(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def summaries(stdout: str) -> list[dict]:
    """Every teacher summary line, its numbers parsed (tokens as ints, the cost as the printed string)."""
    found = []
    for m in SUMMARY.finditer(stdout):
        found.append({"who": m["who"], "sent": int(m["sent"]), "hits": int(m["hits"]), "retries": int(m["retries"]),
                      "prompt": int(m["prompt"].replace(",", "")), "completion": int(m["completion"].replace(",", "")), "cost": m["cost"]})  # fmt: skip
    return found


def priced(prompt: int, completion: int, model: str = "m") -> str:
    """The cost of these tokens at the teacher file's prices, as the summary prints it."""
    p_in, p_out = PRICES[model]
    return f"{(prompt * p_in + completion * p_out) / 1e6:.4f}"


def teacher_file(path: Path, server: FaultServer, model: str = "m") -> Path:
    p_in, p_out = PRICES[model]
    path.write_text(f"backend: openai\nmodel: {model}\nbase_url: {server.base_url}\nprice_per_mtok_in: {p_in:g}\nprice_per_mtok_out: {p_out:g}\n")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cached_samples(cache: Path) -> int:
    """Samples stored in the response cache at `cache` (0 when no database was ever made)."""
    if not (cache / "responses.sqlite").exists():
        return 0
    db = ResponseCache(cache)
    try:
        return db.count()
    finally:
        db.close()


@pytest.fixture
def server():
    srv = FaultServer(replies=REPLIES).start()
    try:
        yield srv
    finally:
        srv.stop()


def command(name: str, tmp: Path, server: FaultServer) -> tuple[list[str], Path]:
    """The arguments of a tiny run of one synth command through the priced teacher file, and its main output."""
    teacher = str(teacher_file(tmp / "teacher.yaml", server))
    prompts = jsonl(tmp / "prompts.jsonl", [{"prompt": "Say one."}, {"prompt": "Say two."}])
    if name == "generate":
        out = tmp / "gen.jsonl"
        return ["generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "-n", "2", "--max-tokens", "16"], out
    if name == "label":
        problems = jsonl(tmp / "gsm.jsonl", [{"question": "What is 2 + 3?", "answer": "#### 5"}, {"question": "What is 1 + 1?", "answer": "#### 2"}])
        second = str(teacher_file(tmp / "teacher2.yaml", server, "m2"))
        out = tmp / "labeled.jsonl"
        return ["label", "--teacher", teacher, "--teacher", second, "--input", str(problems), "--output", str(out), "-n", "2", "--max-tokens", "32"], out
    if name == "expand self-instruct":
        out = tmp / "si.jsonl"
        return ["expand", "self-instruct", "--teacher", teacher, "--output", str(out), "--target", "2", "--max-rounds", "1", "--requests-per-round", "1",
                "--per-request", "2", "--demos", "2", "--machine-demos", "0", "--max-tokens", "64", "--answer-max-tokens", "32"], out  # fmt: skip
    if name == "expand evol":
        pool = jsonl(tmp / "pool.jsonl", [{"id": f"p{i}", "instruction": t} for i, t in enumerate(EVOLVED)])
        out = tmp / "evol.jsonl"
        return ["expand", "evol", "--teacher", teacher, "--input", str(pool), "--output", str(out), "--operations", "deepen",
                "--max-tokens", "64", "--answer-max-tokens", "32"], out  # fmt: skip
    if name == "curate":
        taxonomy = tmp / "taxonomy.yaml"
        taxonomy.write_text("topics: [{name: Algebra}, {name: Probability}]\ntask_types: [quiz]\ndifficulty_levels: [easy]\n")
        out = tmp / "curated.jsonl"
        return ["curate", "--teacher", teacher, "--taxonomy", str(taxonomy), "--output", str(out), "--per-cell", "1",
                "--question-max-tokens", "64", "--answer-max-tokens", "32"], out  # fmt: skip
    if name == "feedback":
        judged = jsonl(tmp / "judged.jsonl", [{"prompt": "What is 2 + 3?", "responses": ["It is 5.", "It is 6."]},
                                              {"prompt": "Name a primary color.", "responses": ["Red.", "Banana."]}])  # fmt: skip
        out = tmp / "rated.jsonl"
        return ["feedback", "--mode", "rate", "--teacher", teacher, "--input", str(judged), "--output", str(out), "--aspects", "helpfulness",
                "--temperatures", "0.5", "--candidates-per-source", "1", "--candidate-max-tokens", "16", "--judge-max-tokens", "64"], out  # fmt: skip
    if name == "self":
        out = tmp / "self.jsonl"
        return ["self", "--student", teacher, "--input", str(prompts), "--output", str(out), "--samples", "2", "--max-tokens", "16",
                "--aspects", "helpfulness", "--judge-max-tokens", "64"], out  # fmt: skip
    raise ValueError(name)


#: Each command and the summary lines it prints: (who the line names, the model of the teacher file it prices), in order.
COMMANDS = {
    "generate": [("teacher", "m")],
    "label": [("teacher {tmp}/teacher.yaml", "m"), ("teacher {tmp}/teacher2.yaml", "m2")],  # one line per teacher
    "expand self-instruct": [("teacher", "m")],
    "expand evol": [("teacher", "m")],
    "curate": [("teacher", "m")],
    "feedback": [("teachers", "m")],
    "self": [("teachers", "m")],
}
#: The records each command's tiny run writes: every stage had work (2 problems x 2 samples x 2 teachers for label).
RECORDS = {"generate": 4, "label": 8, "expand self-instruct": 2, "expand evol": 2, "curate": 2, "feedback": 2, "self": 2}


def check_bill(stdout: str, server: FaultServer, expected: list[tuple[str, str]], tmp: Path) -> list[dict]:
    """The summary lines state what the server billed, and each line's cost is its tokens at its teacher's prices."""
    lines = summaries(stdout)
    assert [x["who"] for x in lines] == [who.format(tmp=tmp) for who, _ in expected], stdout
    billed = server.usage_sent()
    assert (sum(x["prompt"] for x in lines), sum(x["completion"] for x in lines)) == billed, "the summary counts the tokens the server billed"
    assert sum(x["sent"] for x in lines) == server.received
    for line, (_, model) in zip(lines, expected):
        assert line["cost"] == priced(line["prompt"], line["completion"], model), line
        assert float(line["cost"]) > 0 and line["retries"] == 0
    return lines


@pytest.mark.parametrize("name", list(COMMANDS))
def test_cost_in_the_summary_and_no_cache_for_every_synth_command(name, tmp_path, server):
    """Two `--no-cache` runs: each pays for every request (the cost is the billed tokens at the file's prices),
    and the response cache stays empty."""
    args, out = command(name, tmp_path, server)
    cache = tmp_path / "cache"
    first = distill(*args, "--no-cache", "--quiet", cache=cache)
    assert first.returncode == 0, first.stderr
    sent = server.received
    assert sent > 0 and server.faults() == {}
    lines = check_bill(first.stdout, server, COMMANDS[name], tmp_path)
    assert all(x["hits"] == 0 for x in lines)
    assert len(rows(out)) == RECORDS[name], f"{name}: the replies make real records (every stage had work)"
    assert cached_samples(cache) == 0, "--no-cache writes nothing to the response cache"
    records = sorted(out.read_text().splitlines())

    billed = server.usage_sent()
    again = distill(*args, "--no-cache", "--quiet", cache=cache)
    assert again.returncode == 0, again.stderr
    assert server.received == 2 * sent, "a second --no-cache run sends every request again"
    assert server.usage_sent() == (2 * billed[0], 2 * billed[1])
    again_lines = summaries(again.stdout)
    assert [(x["sent"], x["hits"], x["prompt"], x["completion"], x["cost"]) for x in again_lines] == [
        (x["sent"], 0, x["prompt"], x["completion"], x["cost"]) for x in lines
    ]
    assert cached_samples(cache) == 0
    assert sorted(out.read_text().splitlines()) == records, "the same answers make the same records"


def test_refresh_overwrites_the_cache_and_a_plain_rerun_serves_the_new_answers(tmp_path, server):
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say one."}, {"prompt": "Say two."}])
    teacher = str(teacher_file(tmp_path / "teacher.yaml", server))
    out, cache = tmp_path / "gen.jsonl", tmp_path / "cache"
    args = ["generate", "--teacher", teacher, "--input", str(prompts), "--output", str(out), "-n", "2", "--seed", "7", "--max-tokens", "16", "--quiet"]

    def answers() -> list[str]:
        return sorted(r["messages"][-1]["content"] for r in rows(out))

    first = distill(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    check_bill(first.stdout, server, COMMANDS["generate"], tmp_path)
    old = answers()
    assert len(old) == 4 and all(a.startswith("echo: Say ") and not a.endswith("(v2)") for a in old)
    assert cached_samples(cache) == 4
    before = out.read_bytes()

    server.answer_suffix = " (v2)"  # the teacher now answers differently
    cached = distill(*args, cache=cache)
    assert cached.returncode == 0, cached.stderr
    assert server.received == 2 and "teacher: 0 requests sent, 4 samples from cache" in cached.stdout
    assert out.read_bytes() == before, "a plain rerun serves the cached answers"

    refreshed = distill(*args, "--refresh", cache=cache)
    assert refreshed.returncode == 0, refreshed.stderr
    assert server.received == 4 and "teacher: 2 requests sent, 0 samples from cache" in refreshed.stdout
    assert answers() == [a + " (v2)" for a in old], "--refresh writes the teacher's new answers"
    assert cached_samples(cache) == 4, "overwritten, not added beside the old ones"
    after = out.read_bytes()

    server.answer_suffix = " (v3)"  # were the cache not overwritten, a plain run could not know (v2)
    plain = distill(*args, cache=cache)
    assert plain.returncode == 0, plain.stderr
    assert server.received == 4 and "teacher: 0 requests sent, 4 samples from cache" in plain.stdout
    assert out.read_bytes() == after, "the refreshed answers are what the cache serves now"


def test_408_is_retried_once_then_succeeds(server):
    from synth.teachers import ChatRequest, SamplingParams, TeacherSettings
    from synth.teachers.openai_api import OpenAITeacher

    teacher = OpenAITeacher(TeacherSettings(backend="openai", model="m", base_url=server.base_url, timeout=5.0, max_retries=3,
                                            backoff_base=0.01, backoff_max=0.05))  # fmt: skip
    request = ChatRequest(messages=[{"role": "user", "content": "hello !fault=408*1"}], params=SamplingParams(seed=1, max_tokens=16))

    async def go():
        try:
            return await teacher.generate([request])
        finally:
            await teacher.aclose()

    [result] = asyncio.run(go())
    assert not isinstance(result, Exception), result
    assert result.completions[0].text == f"echo: hello !fault=408*1 #{request.sample_seed(0)}"
    assert server.received == 2 and server.faults() == {"408": 1}
    assert teacher.stats.retries == 1 and teacher.stats.requests_ok == 1


def test_evol_judge_equal_eliminates_and_each_stage_line_counts_its_own_cost(tmp_path, server):
    """--info-gain teacher: the judge says "Equal" to one evolution (eliminated, with its reason) and "Not Equal"
    to the other (answered, kept). Without --quiet each stage ends with its own progress line, and their costs
    (and tokens) add up to the summary's."""
    args, out = command("expand evol", tmp_path, server)
    result = distill(*args, "--info-gain", "teacher", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    [line] = check_bill(result.stdout, server, COMMANDS["expand evol"], tmp_path)

    equal, kept = EVOLVED["Name a red fruit."], EVOLVED["Explain what rain is."]
    records = rows(out)
    assert [(r["prompt"][0]["content"], r["meta"]["parent"]) for r in records] == [(kept, "p1")]
    assert all(equal not in json.dumps(r) for r in records)
    rejects = rows(tmp_path / "evol.rejects.jsonl")
    assert [(r["reason"], r["raw"], r["input"]["parent"]) for r in rejects] == [
        ("[round-1] no information gain: the teacher judged it equal to the original", [equal], "p0")
    ]
    verdicts = {v["id"]: v["equal"] for v in rows(tmp_path / "evol.work" / "round-1-judge.jsonl")}
    assert sorted(verdicts.values()) == [False, True]

    final = {m["label"]: m for m in PROGRESS.finditer(result.stderr)}  # the last line of each stage
    assert list(final) == ["evol round 1", "evol round 1 judge", "evol round 1 answers"], result.stderr
    costs = [final[label]["cost"] for label in final]
    assert all(float(c) > 0 for c in costs), costs
    assert f"{sum(float(c) for c in costs):.4f}" == line["cost"], f"stage lines {costs} vs summary {line['cost']}"
    assert sum(int(m["tok"].replace(",", "")) for m in final.values()) == line["prompt"] + line["completion"]

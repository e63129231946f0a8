"""Never leak a secret: credentials planted in teacher URLs and the API key's environment variable
appear in no file a command writes and in none of its output, for every command that takes a teacher.

Each case runs one command in process (`distill.cli.main`, output captured) against the stub
OpenAI-compatible server, with a teacher URL carrying a userinfo password, `?api_key=` and
`?token=`, and the API key in the environment; then every file the run wrote (outputs, rejects,
cards, reports, stage folders, `.recipe/`, the response cache with its WAL) and everything it
printed are searched for each secret. Failing runs (a refused connection, a bad port) are cases
too: their one error line must not carry the credentials either.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from distill.cli import main
from tests.conftest import free_port
from tests.fault_server import FaultServer
from tests.reliability.harness import ROOT, cli_env
from tests.tiny_models import make_tiny_llama

#: What a careless user puts where it does not belong; none of it may come back out.
SECRETS = {
    "userinfo password": "Pw-userinfo-7Q2x",
    "api_key query parameter": "QueryKey-9f8e7d",
    "token query parameter": "QueryToken-1a2b3c",
    "API key in the environment": "EnvKey-Zq81-plain",
}
KEY_ENV = "BBD_HOSTILE_KEY"


def with_credentials(base_url: str) -> str:
    """`base_url` with every URL-borne secret planted: userinfo, ?api_key= and &token=."""
    return base_url.replace("http://", f"http://bbduser:{SECRETS['userinfo password']}@") + (
        f"?api_key={SECRETS['api_key query parameter']}&token={SECRETS['token query parameter']}"
    )


def with_token(base_url: str) -> str:
    """`base_url` with only a ?token=: the API key from the environment is then sent as the bearer token."""
    return f"{base_url}?token={SECRETS['token query parameter']}"


@dataclass
class Ctx:
    """Where one case reads its inputs and writes its outputs, and the teacher URLs it uses."""

    inputs: Path
    out: Path
    url: str  # every URL-borne secret
    token_url: str  # only ?token=

    def prompts(self, rows: list[dict] | None = None) -> str:
        path = self.inputs / "prompts.jsonl"
        rows = rows or [{"prompt": "What is 2 + 2?"}, {"prompt": "Name a colour."}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def student(self) -> str:
        path = self.inputs / "student"
        if not path.exists():
            make_tiny_llama(path)
        return str(path)


def _generate(c: Ctx) -> list[str]:
    return ["generate", "--teacher", f"openai:echo@{c.url}", "--input", c.prompts(), "--output", str(c.out / "gen.jsonl"), "--max-tokens", "4",
            "--max-retries", "0"]  # fmt: skip


def _label_two_teachers(c: Ctx) -> list[str]:
    questions = c.prompts([{"question": "What is 2 + 2?", "answer": "#### 4"}])
    return ["label", "--teacher", f"openai:a@{c.url}", "--teacher", f"openai:b@{c.token_url}", "--input", questions,
            "--output", str(c.out / "labeled.jsonl"), "-n", "1", "--max-tokens", "8", "--max-retries", "0"]  # fmt: skip


def _self_instruct(c: Ctx) -> list[str]:
    seeds = c.inputs / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in ("Name a red fruit please.", "List two long rivers.")))
    return ["expand", "self-instruct", "--teacher", f"openai:echo@{c.url}", "--seeds", str(seeds), "--target", "1", "--max-rounds", "1",
            "--requests-per-round", "1", "--demos", "2", "--output", str(c.out / "si.jsonl"), "--max-tokens", "8", "--answer-max-tokens", "4"]  # fmt: skip


def _evol(c: Ctx) -> list[str]:
    instructions = c.prompts([{"instruction": "Name a red fruit please."}])
    return ["expand", "evol", "--teacher", f"openai:echo@{c.url}", "--input", instructions, "--rounds", "1",
            "--output", str(c.out / "evol.jsonl"), "--max-tokens", "8", "--answer-max-tokens", "4", "--judge-max-tokens", "4"]  # fmt: skip


def _curate(c: Ctx) -> list[str]:
    taxonomy = c.inputs / "taxonomy.yaml"
    taxonomy.write_text("topics: [{name: Arithmetic}]\ntask_types: [quiz]\ndifficulty_levels: [easy]\n")
    return ["curate", "--teacher", f"openai:echo@{c.url}", "--taxonomy", str(taxonomy), "--per-cell", "1",
            "--instruction", '{"questions": ["What is 2 + 2?"]}', "--output", str(c.out / "curated.jsonl"),
            "--question-max-tokens", "32", "--answer-max-tokens", "4"]  # fmt: skip


def _feedback(c: Ctx) -> list[str]:
    # The echo judge repeats the prompt, so the critique written in it is the judge's reply: a record is kept.
    prompt = 'Reply {"critique": "too short", "score": 3, "corrected": "Four."}'
    spec = f"openai:echo@{c.url}"
    return ["feedback", "--mode", "critique", "--teacher", spec, "--student", f"openai:student@{c.token_url}", "--judge", spec,
            "--input", c.prompts([{"prompt": prompt}]), "--output", str(c.out / "fb.jsonl"), "--candidate-max-tokens", "4"]  # fmt: skip


def _self(c: Ctx) -> list[str]:
    # The echo student rates its answers with the rating written in the prompt: a record is kept.
    prompt = 'Rate {"helpfulness": {"rating": 7, "rationale": "fine"}}'
    return ["self", "--student", f"openai:echo@{c.url}", "--input", c.prompts([{"prompt": prompt}]), "--samples", "2",
            "--aspects", "helpfulness", "--min-margin", "0", "--no-refine", "--max-tokens", "4", "--output", str(c.out / "self.jsonl")]  # fmt: skip


def _eval(c: Ctx) -> list[str]:
    prompts = c.prompts([{"question": "What is 2 + 2?", "answer": "#### 4"}])
    return ["eval", "--students", c.student(), "--teacher", f"openai:echo@{c.url}", "--judge", f"openai:judge@{c.token_url}",
            "--prompts", prompts, "--template", "none", "--limit", "1", "--max-new-tokens", "2", "--teacher-max-tokens", "4",
            "--judge-max-tokens", "4", "--output-dir", str(c.out / "eval"), "--device", "cpu"]  # fmt: skip


def _teacher_check(c: Ctx) -> list[str]:
    return ["teacher", "check", "--teacher", f"openai:echo@{c.url}", "--max-retries", "0"]


def _recipe(c: Ctx, teacher: str, *, with_eval: bool) -> list[str]:
    recipe = c.inputs / "recipe.yaml"
    stages = f"  - {{name: answers, command: generate, input: {c.prompts()}, output: {c.out}/answers.jsonl, max_tokens: 4}}\n"
    if with_eval:
        stages += (f"  - {{name: check, command: eval, students: ['{c.student()}'], prompts: {c.prompts()}, template: none, limit: 1,"
                   f" max_new_tokens: 2, teacher_max_tokens: 4, output_dir: {c.out}/eval, device: cpu}}\n")  # fmt: skip
    recipe.write_text(f"name: secret\nwork_dir: {c.out}\nteacher: {teacher}\nstages:\n{stages}")
    return ["run", str(recipe)]


def _recipe_mapping(c: Ctx) -> list[str]:
    # The mapping is written to .recipe/teacher.yaml for the stages to read: the secrets must stay out of it.
    teacher = f"{{backend: openai, model: echo, base_url: '{c.url}', api_key_env: {KEY_ENV}, max_retries: 0}}"
    return _recipe(c, teacher, with_eval=True)


def _recipe_spec(c: Ctx) -> list[str]:
    return _recipe(c, f"'openai:echo@{c.token_url}'", with_eval=False)


@dataclass
class Case:
    """One command line to run with planted secrets, and whether its teacher answers."""

    build: Callable[[Ctx], list[str]]
    #: False: the teacher cannot be reached, the command fails with one line.
    reachable: bool = True
    #: The teacher port, when unreachable: "refused" (nothing listens) or "bad" (out of range).
    port: str = "refused"


CASES = {
    "generate": Case(_generate),
    "label-two-teachers": Case(_label_two_teachers),
    "expand-self-instruct": Case(_self_instruct),
    "expand-evol": Case(_evol),
    "curate": Case(_curate),
    "feedback-teacher-student-judge": Case(_feedback),
    "self": Case(_self),
    "eval-with-teacher-and-judge": Case(_eval),
    "teacher-check": Case(_teacher_check),
    "run-recipe-teacher-mapping": Case(_recipe_mapping),
    "run-recipe-teacher-spec": Case(_recipe_spec),
    "generate-connection-refused": Case(_generate, reachable=False),
    "generate-bad-port": Case(_generate, reachable=False, port="bad"),
    "label-connection-refused": Case(_label_two_teachers, reachable=False),
    "eval-connection-refused": Case(_eval, reachable=False),
    "teacher-check-connection-refused": Case(_teacher_check, reachable=False),
    "run-recipe-connection-refused": Case(_recipe_mapping, reachable=False),
}


def leaks(root: Path, skip: Path, printed: str) -> list[str]:
    """`secret in place` for every planted secret found in a file under `root` (outside `skip`) or in `printed`."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and skip not in p.parents):
        data = path.read_bytes()
        found += [f"{what} in {path.relative_to(root)}" for what, s in SECRETS.items() if s.encode() in data]
    found += [f"{what} in the output" for what, s in SECRETS.items() if s in printed]
    return found


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_no_planted_secret_in_any_file_or_output_of_a_command(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", SECRETS["API key in the environment"])
    monkeypatch.setenv(KEY_ENV, SECRETS["API key in the environment"])
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    # No JSON response formats: the echo of a prompt that holds JSON is then a parsable reply.
    with FaultServer(json_schema=False, json_object=False) as server:
        base = server.base_url if case.reachable else f"http://127.0.0.1:{free_port() if case.port == 'refused' else 99999}/v1"
        ctx = Ctx(inputs, tmp_path / "out", with_credentials(base), with_token(base))
        argv = case.build(ctx)
        capsys.readouterr()  # what building the inputs printed is not the command's
        code = main([*argv, "--quiet"] if argv[0] not in ("run", "eval", "teacher") else argv)
        printed = "".join(capsys.readouterr())
        if case.reachable:
            assert code == 0, printed[-3000:]
            assert server.received > 0, "the teacher URL with credentials must still reach the server"
        else:
            assert code == 1, printed[-3000:]
            assert "error" in printed and "Traceback" not in printed, printed[-3000:]
    assert not leaks(tmp_path, inputs, printed), printed[-3000:]


def test_no_planted_secret_in_the_journal_of_a_killed_run(tmp_path):
    """A run killed mid-job leaves its `.partial` journal (and the cache): neither may hold a secret."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    prompts = inputs / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "answered"}) + "\n" + json.dumps({"prompt": "never answered !fault=stall"}) + "\n")
    out = tmp_path / "out" / "gen.jsonl"
    journal = out.with_name(out.name + ".partial")
    with FaultServer(stall_s=60) as server:
        args = ["generate", "--teacher", f"openai:echo@{with_credentials(server.base_url)}", "--input", str(prompts),
                "--output", str(out), "--concurrency", "1", "--max-retries", "0", "--timeout", "60"]  # fmt: skip
        env = cli_env(tmp_path / "cache", {"OPENAI_API_KEY": SECRETS["API key in the environment"]})
        proc = subprocess.Popen([sys.executable, "-m", "distill", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Killed once the first answer is in the journal and the second request hangs at the server.
            while proc.poll() is None and not (server.received == 2 and journal.exists() and journal.stat().st_size > 0):
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            proc.send_signal(signal.SIGKILL)
        finally:
            printed = "".join(proc.communicate(timeout=60))
    assert journal.stat().st_size > 0 and not out.exists()
    assert not leaks(tmp_path, inputs, printed)


def test_a_recipe_teacher_file_read_by_another_process_fails_clearly_instead_of_sending_the_mask(tmp_path, monkeypatch, capsys):
    import synth.redact

    monkeypatch.setenv(KEY_ENV, SECRETS["API key in the environment"])
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(tmp_path / "cache"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with FaultServer() as server:
        ctx = Ctx(inputs, tmp_path / "out", with_credentials(server.base_url), with_token(server.base_url))
        recipe = _recipe(ctx, f"{{backend: openai, model: echo, base_url: '{ctx.url}', api_key_env: {KEY_ENV}, max_retries: 0}}", with_eval=False)
        assert main(recipe) == 0, capsys.readouterr()
        sent = server.received
        saved = ctx.out / ".recipe" / "teacher.yaml"
        assert "base_url: http://***@127.0.0.1:" in saved.read_text() and "api_key=***" in saved.read_text()
        monkeypatch.setattr(synth.redact, "_REAL", {})  # what another process knows: only the file
        capsys.readouterr()
        code = main(["generate", "--teacher", str(saved), "--input", ctx.prompts(), "--output", str(tmp_path / "again.jsonl"), "--quiet"])
        printed = "".join(capsys.readouterr())
        assert server.received == sent, "nothing is sent with a masked password"
    assert code == 1 and "credentials were masked when it was saved" in printed and printed.count("\n") == 1, printed
    assert not leaks(tmp_path, inputs, printed)

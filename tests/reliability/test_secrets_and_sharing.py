"""Secrets never leave the environment, model code and templates cannot run code, and two jobs can share one cache."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

from synth.teachers import TeacherSettings, parse_teacher_spec
from tests.conftest import free_port
from tests.fault_server import FaultServer
from tests.reliability.harness import ROOT, cli_env, run_cli, write_prompts
from tests.tiny_models import make_tiny_llama
from trainers.settings import TrainSettings

KEY = "sk-test-0f9e8d7c6b5a4F3E2D1C0B9A"


def test_api_key_from_the_environment_is_in_no_file_a_run_writes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q {i}{' !fault=400' if i == 2 else ''}"}) + "\n" for i in range(5)))
    env = {"MY_TEACHER_KEY": KEY}
    with FaultServer() as server:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(
            f"name: secret\nwork_dir: {tmp_path}/run\n"
            f"teacher: {{backend: openai, model: echo, base_url: '{server.base_url}', api_key_env: MY_TEACHER_KEY, max_retries: 0}}\n"
            f"stages:\n  - name: answers\n    command: generate\n    input: {prompts}\n    output: {tmp_path}/run/answers.jsonl\n"
        )
        logs = [run_cli("run", str(recipe), cache=tmp_path / "cache", env=env)]
        assert logs[0].returncode == 0, logs[0].stderr
        assert server.received == 5
    # A failing run: its exception message must not carry the key either.
    logs.append(run_cli("generate", "--teacher", f"openai:echo@http://127.0.0.1:{free_port()}/v1", "--api-key-env", "MY_TEACHER_KEY",
                        "--max-retries", "0", "--input", str(prompts), "--output", str(tmp_path / "x.jsonl"), cache=tmp_path / "cache", env=env))
    assert logs[1].returncode == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "recipe.yaml"]
    names = {p.name for p in written}
    assert {"answers.jsonl", "answers.rejects.jsonl", "README.md", "responses.sqlite", "answers.json"} <= names, names
    leaks = [str(p) for p in written if KEY.encode() in p.read_bytes()]
    leaks += [f"log {i}" for i, log in enumerate(logs) if KEY in log.stdout + log.stderr]
    assert not leaks, f"the API key leaked into {leaks}"


def test_trust_remote_code_is_off_unless_asked_and_checkpoint_code_never_runs(tmp_path):
    assert TeacherSettings().trust_remote_code is False and parse_teacher_spec("hf:/m").trust_remote_code is False
    assert TrainSettings().trust_remote_code is False
    model = make_tiny_llama(tmp_path / "model")
    marker = tmp_path / "remote_code_ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (model / "config.json").write_text(json.dumps(config))
    prompts = write_prompts(tmp_path / "in.jsonl", 1)
    result = run_cli("generate", "--teacher", f"hf:{model}", "--max-tokens", "2", "--keep-truncated", "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     "--quiet", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists(), "code shipped with a checkpoint ran without trust_remote_code"


def test_templates_render_seed_data_as_text_and_refuse_code(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "{{ 7 * 7 }} {{ lipsum.__globals__ }}"}) + "\n")
    plain = tmp_path / "plain.jinja"
    plain.write_text("Q: {{ question }}")
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "') }}")
    with FaultServer() as server:
        teacher = f"openai:echo@{server.base_url}"
        ok = run_cli("generate", "--teacher", teacher, "--template", str(plain), "--input", str(questions), "--output", str(tmp_path / "a.jsonl"),
                     "--quiet", cache=tmp_path / "cache")
        assert ok.returncode == 0, ok.stderr
        assert server.bodies[0]["messages"][-1]["content"] == "Q: {{ 7 * 7 }} {{ lipsum.__globals__ }}", "seed data is text, never a template"
        bad = run_cli("generate", "--teacher", teacher, "--template", str(evil), "--input", str(questions), "--output", str(tmp_path / "b.jsonl"),
                      cache=tmp_path / "cache")
    assert bad.returncode == 1 and "refused by the sandbox" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "b.jsonl").exists()


def test_two_processes_sharing_one_cache_corrupt_neither_it_nor_each_other(tmp_path):
    prompts = write_prompts(tmp_path / "in.jsonl", 400)
    cache = tmp_path / "cache"
    with FaultServer(latency=0.005) as server:
        def start(name: str) -> subprocess.Popen:
            args = ["generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(tmp_path / name),
                    "--concurrency", "16", "--seed", "1", "--quiet"]
            return subprocess.Popen([sys.executable, "-m", "distill", *args], env=cli_env(cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        procs = [start("a.jsonl"), start("b.jsonl")]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        assert max(server.answered().values()) <= 2, "at worst both asked for the same sample at the same moment"
        rerun = run_cli("generate", "--teacher", f"openai:echo@{server.base_url}", "--input", str(prompts), "--output", str(tmp_path / "c.jsonl"),
                        "--concurrency", "16", "--seed", "1", "--quiet", cache=cache)
        assert rerun.returncode == 0 and "0 requests sent, 400 samples from cache" in rerun.stdout
    a, b = (sorted((tmp_path / n).read_text().splitlines()) for n in ("a.jsonl", "b.jsonl"))
    assert len(a) == 400 and a == b
    con = sqlite3.connect(cache / "responses.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert con.execute("SELECT COUNT(*) FROM samples").fetchone() == (400,)

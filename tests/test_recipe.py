"""Recipes: stages feed each other by name, reruns skip finished stages, typos fail before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.recipe import load_recipe, parse_assignments
from synth.errors import ConfigError
from tests.tiny_models import make_tiny_llama


def distill(*args: str, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=full_env, timeout=300)


def write_recipe(tmp_path: Path, base_url: str, model: Path, extra: str = "") -> Path:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What color is thing {i}?"}) + "\n" for i in range(6)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
name: mini
work_dir: {tmp_path}/run
vars:
  out: {tmp_path}/run
teacher: openai:echo@{base_url}
stages:
  - name: answers
    command: generate
    input: {prompts}
    output: ${{out}}/answers.jsonl
    max_tokens: 16
    quiet: true
  - name: sft
    command: train sft
    model: {model}
    data: "@answers"
    output_dir: ${{out}}/student
    max_steps: ${{STEPS}}
    batch_size: 2
    max_length: 64
{extra}""")
    return recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_recipe_runs_skips_when_unchanged_and_reruns_from_a_stage(tmp_path, tiny, fault_server):
    recipe = write_recipe(tmp_path, fault_server.base_url, tiny)
    env = {"STEPS": "2"}
    first = distill("run", str(recipe), cache=tmp_path / "cache", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "run/answers.jsonl").exists() and (tmp_path / "run/student/config.json").exists()
    assert fault_server.received == 6

    plan = distill("run", str(recipe), "--dry-run", cache=tmp_path / "cache", env=env)
    assert plan.stdout.count("    done") == 2, plan.stdout

    again = distill("run", str(recipe), cache=tmp_path / "cache", env=env)
    assert again.returncode == 0 and again.stdout.count("skipped") == 2
    assert fault_server.received == 6, "a rerun makes no teacher call"

    changed = distill("run", str(recipe), cache=tmp_path / "cache", env={"STEPS": "3"})
    assert changed.returncode == 0 and changed.stdout.count("skipped") == 1, "only the changed stage reruns"
    history = json.loads((tmp_path / "run/student/metrics.json").read_text())["history"]
    assert max(row.get("step", 0) for row in history) == 3

    forced = distill("run", str(recipe), "--from", "answers", cache=tmp_path / "cache", env={"STEPS": "3"})
    assert forced.returncode == 0 and "skipped" not in forced.stdout
    assert fault_server.received == 6, "a forced rerun still answers from the cache"


def test_typos_and_unknown_refs_fail_before_any_work(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("STEPS", "1")
    bad_key = write_recipe(tmp_path, "http://127.0.0.1:9/v1", tiny, extra="    lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"stage 'sft' \(train sft\): unknown key 'lerning_rate'"):
        load_recipe(bad_key)
    bad_ref = tmp_path / "ref.yaml"
    bad_ref.write_text("stages:\n  - name: a\n    command: train sft\n    data: '@nope'\n")
    with pytest.raises(ConfigError, match="'@nope' names no earlier stage"):
        load_recipe(bad_ref)
    bad_var = tmp_path / "var.yaml"
    bad_var.write_text("stages:\n  - name: a\n    command: train sft\n    data: ${NOT_SET_ANYWHERE}\n")
    with pytest.raises(ConfigError, match=r"\$\{NOT_SET_ANYWHERE\} is not set"):
        load_recipe(bad_var)
    result = distill("run", str(bad_key), cache=tmp_path / "cache")
    assert result.returncode == 1 and "unknown key 'lerning_rate'" in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.jsonl"))


def test_a_stage_that_reads_another_kind_of_record_than_its_source_writes_fails_before_any_work(tmp_path):
    def recipe(*stages: str) -> Path:
        path = tmp_path / "kinds.yaml"
        path.write_text("stages:\n" + "".join(stages))
        return path

    label = f"  - name: label\n    command: label\n    input: {tmp_path}/q.jsonl\n    output: {tmp_path}/labeled.jsonl\n"
    dpo = "  - name: dpo\n    command: train dpo\n    data: '@label'\n    output_dir: " + str(tmp_path / "dpo") + "\n"
    with pytest.raises(ConfigError, match=r"stage 'dpo' \(train dpo\) reads preference pairs, but stage 'label' \(label\) writes SFT examples"):
        load_recipe(recipe(label, dpo))
    result = distill("run", str(tmp_path / "kinds.yaml"), cache=tmp_path / "cache")
    assert result.returncode == 1 and "stage 'label' (label) writes SFT examples" in result.stderr
    assert not (tmp_path / "labeled.jsonl").exists() and not (tmp_path / "dpo").exists()

    critique = f"  - name: fb\n    command: feedback\n    mode: critique\n    input: {tmp_path}/q.jsonl\n    output: {tmp_path}/critiques.jsonl\n"
    on_critiques = "  - name: sft\n    command: train sft\n    data: '@fb'\n"
    with pytest.raises(ConfigError, match=r"stage 'sft' \(train sft\) reads SFT examples, but stage 'fb' \(feedback\) writes critiques"):
        load_recipe(recipe(critique, on_critiques))

    rate = f"  - name: fb\n    command: feedback\n    input: {tmp_path}/q.jsonl\n    output: {tmp_path}/pairs.jsonl\n"
    assert [s.name for s in load_recipe(recipe(label, "  - name: sft\n    command: train sft\n    data: '@label'\n")).stages] == ["label", "sft"]
    assert len(load_recipe(recipe(rate, dpo.replace("@label", "@fb"))).stages) == 2
    assert len(load_recipe(recipe(label, "  - name: grpo\n    command: train grpo\n    data: '@label'\n")).stages) == 2, "RL reads any prompts"


def test_var_and_set_override_the_recipe_and_are_checked_like_it(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("STEPS", "1")
    recipe = write_recipe(tmp_path, "http://127.0.0.1:9/v1", tiny)
    loaded = load_recipe(recipe, {"out": str(tmp_path / "elsewhere")}, parse_assignments(["sft.max_steps=7", "answers.quiet=false"], "--set", dotted=True))
    sft = next(s for s in loaded.stages if s.name == "sft")
    assert sft.argv[sft.argv.index("--max-steps") + 1] == "7" and str(tmp_path / "elsewhere" / "student") in sft.argv
    assert "--quiet" not in next(s for s in loaded.stages if s.name == "answers").argv
    with pytest.raises(ConfigError, match=r"--set lable\.…: no stage 'lable' \(stages: answers, sft\)"):
        load_recipe(recipe, None, parse_assignments(["lable.limit=3"], "--set", dotted=True))
    with pytest.raises(ConfigError, match=r"stage 'sft' \(train sft\): unknown key 'max_stpes'"):
        load_recipe(recipe, None, parse_assignments(["sft.max_stpes=3"], "--set", dotted=True))
    with pytest.raises(ConfigError, match=r"--set 'limit=3': expected STAGE.KEY=VALUE"):
        parse_assignments(["limit=3"], "--set", dotted=True)
    result = distill("run", str(recipe), "--dry-run", "--set", "sft.max_steps=lots", cache=tmp_path / "cache")
    assert result.returncode == 1 and "key 'max_steps': Input should be a valid integer" in result.stderr, result.stderr


def test_a_stage_model_served_as_a_teacher_is_a_dependency_and_fingerprinted(tmp_path):
    from distill.recipe import fingerprint

    student = tmp_path / "student"
    recipe = tmp_path / "pref.yaml"
    recipe.write_text(f"""
stages:
  - name: student
    command: student derive
    keep: 0.5
    out: {student}
  - name: feedback
    command: feedback
    input: {tmp_path}/prompts.jsonl
    output: {tmp_path}/pairs.jsonl
    student: "hf:@student"
""")
    stage = load_recipe(recipe).stages[1]
    assert stage.depends == ["student"]
    assert stage.argv[stage.argv.index("--student") + 1] == f"hf:{student}"
    student.mkdir()
    (student / "config.json").write_text("{}")
    before = fingerprint(stage)
    (student / "model.safetensors").write_text("new weights")
    assert fingerprint(stage) != before, "a re-derived student makes its candidates stale"


def test_a_stage_fingerprints_the_code_and_templates_it_runs():
    from distill.code_fingerprint import stage_code_files

    def names(command, settings=None):
        return {f"{p.parent.name}/{p.name}" for p in stage_code_files(command, settings)}

    assert {"trainers/rloo.py", "trainers/grpo.py", "trainers/rl_common.py", "trainers/common.py"} <= names(["train", "rloo"])
    assert {"trainers/evaluate.py", "trainers/eval_metrics.py", "trainers/report.py", "label/cot.en.jinja"} <= names(["eval"])
    assert {"trainers/student.py"} <= names(["student", "derive"])
    assert {"generators/raw.py", "label/cot.en.jinja"} <= names(["generate"], {"template": "label/cot"})
    assert {"feedback/self_knowledge.py", "self/reward.en.jinja"} <= names(["self"])
    assert "trainers/sft.py" not in names(["train", "dpo"]), "a method's fingerprint leaves other methods' code out"

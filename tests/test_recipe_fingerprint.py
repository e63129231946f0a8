"""A stage's fingerprint covers the code it runs (found by walking imports) and the content of the models it reads."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from distill import code_fingerprint, content_hash
from distill.code_fingerprint import stage_code_files
from distill.recipe import Stage, fingerprint, load_recipe
from tests.tiny_models import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
METHODS = ["dpo", "gkd", "grpo", "kd", "ppo", "reward", "rloo", "sft"]
#: Every command a recipe stage can run, with the template folders it loads.
COMMANDS = {
    "generate": set(),
    "label": {"label"},
    "expand self-instruct": {"expand"},
    "expand evol": {"expand"},
    "curate": {"curate"},
    "feedback": {"feedback"},
    "self": {"self"},
    "eval": {"label"},
    "student derive": set(),
    **{f"train {m}": set() for m in METHODS},
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the source tree: the tests edit its files, never the checkout's."""
    root = tmp_path_factory.mktemp("src")
    for name in ("synth", "trainers", "distill", "prompts"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def stage(command: str, settings: dict | None = None) -> Stage:
    return Stage("s", command.split(), settings or {}, command.split(), None, [])


def touched(path: Path) -> str:
    """Append a comment line to a module or template; returns the original text to put back."""
    original = path.read_text(encoding="utf-8")
    path.write_text(original + ("{# touched #}\n" if path.suffix == ".jinja" else "# touched\n"), encoding="utf-8")
    return original


def defining(root: Path, name: str) -> Path:
    """The module of the tree that defines `name` at top level (where it lives may change; what it does does not)."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_bytes()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                return path
    raise AssertionError(f"nothing in {root} defines {name}")


def test_every_trainer_method_is_checked():
    import trainers

    assert set(trainers.METHODS) == set(METHODS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_change_to_any_module_or_template_the_stage_runs_reruns_it_and_no_other_change_does(tree, command):
    s = stage(command)
    files = stage_code_files(s.command, root=tree)
    before = fingerprint(s, root=tree)
    for path in files:
        original = touched(path)
        try:
            assert fingerprint(s, root=tree) != before, f"{command}: a change to {path.relative_to(tree)} is not seen"
        finally:
            path.write_text(original, encoding="utf-8")
    assert fingerprint(s, root=tree) == before

    others = [p for p in sorted(tree.rglob("*")) if p.suffix in (".py", ".jinja") and p not in files]
    assert others, command
    originals = {p: touched(p) for p in others}
    try:
        assert fingerprint(s, root=tree) == before, f"{command}: a change outside its code reruns it"
    finally:
        for path, text in originals.items():
            path.write_text(text, encoding="utf-8")

    folders = {p.relative_to(tree / "prompts").parts[0] for p in files if p.suffix == ".jinja"}
    assert folders == COMMANDS[command], f"{command} loads templates from {sorted(folders)}"


def test_the_code_of_a_stage_is_what_it_imports_not_a_list(tree):
    def code(command: str) -> set[Path]:
        return set(stage_code_files(command.split(), root=tree))

    assert tree / "trainers/ppo.py" not in code("generate")
    assert tree / "synth/generators/curate/stages.py" not in code("train sft")
    assert tree / "trainers/sft.py" not in code("train dpo")
    assert {tree / "trainers/kd.py", tree / "trainers/sft.py", tree / "trainers/kd_loss.py"} <= code("train kd")
    # The drift of the hand-kept tables: `self` runs the feedback judges, raw sampling and the checker;
    # `label` builds soft labels in raw.py; `eval` prompts through labeling's generator.
    for name in ("CandidateGenerator", "RateGenerator", "soft_labels_of", "extract_answer"):
        assert defining(tree, name) in code("self"), name
    assert defining(tree, "soft_labels_of") in code("label")
    assert defining(tree, "LabelGenerator") in code("eval")
    shared = {tree / "synth/records.py", tree / "synth/io.py", tree / "synth/teachers/base.py", defining(tree, "Generator")}
    for command in ("generate", "label", "curate", "feedback", "self", "eval", "expand evol"):
        assert shared <= code(command), command


def test_a_template_the_settings_name_is_part_of_the_code(tree):
    s = stage("generate", {"template": "label/cot"})
    before = fingerprint(s, root=tree)
    original = touched(tree / "prompts/label/cot.en.jinja")
    try:
        assert fingerprint(s, root=tree) != before
        assert fingerprint(stage("generate"), root=tree) == fingerprint(stage("generate"), root=tree)
    finally:
        (tree / "prompts/label/cot.en.jinja").write_text(original, encoding="utf-8")


def test_the_root_defaults_to_the_module_setting(tree, monkeypatch):
    s = stage("generate")
    monkeypatch.setattr(code_fingerprint, "ROOT", tree)
    before = fingerprint(s)
    assert before == fingerprint(s, root=tree)
    original = touched(tree / "synth/records.py")
    try:
        assert fingerprint(s) != before
    finally:
        (tree / "synth/records.py").write_text(original, encoding="utf-8")


def same_size_new_weights(model: Path) -> None:
    """Rewrite the model's weights in place with other values: same names, shapes and file size."""
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    size = path.stat().st_size
    tensors = {k: v + 1 for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert path.stat().st_size == size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_a_model_directory_is_hashed_by_content_not_by_place_or_time(tmp_path, tiny):
    model = shutil.copytree(tiny, tmp_path / "model")
    first = content_hash.content_hash(model)
    copy = shutil.copytree(model, tmp_path / "copy")  # new mtimes, new place
    assert content_hash.content_hash(copy) == first
    (model / "checkpoint-1").mkdir()
    (model / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    (model / ".cache").mkdir()
    (model / ".cache" / "download.metadata").write_text("fetched just now")
    assert content_hash.content_hash(model) == first, "checkpoints and download metadata are not the model"
    same_size_new_weights(model)
    assert content_hash.content_hash(model) != first


def test_a_big_file_is_read_again_only_after_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(content_hash, "KEEP_DIGEST_BYTES", 0)
    monkeypatch.setattr(content_hash, "_SETTLED_S", -1.0)
    monkeypatch.setattr(content_hash, "_kept", None)
    monkeypatch.setenv("BBD_DIGEST_CACHE", str(tmp_path / "kept.json"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 4096)
    first = content_hash.file_digest(weights)
    assert json.loads((tmp_path / "kept.json").read_text())[str(weights.resolve())]["sha256"] == first
    reads = []
    monkeypatch.setattr(content_hash, "_sha256", lambda p: reads.append(p) or "fresh")
    assert content_hash.file_digest(weights) == first and not reads, "an unchanged file is not read again"
    weights.write_bytes(b"b" * 4096)  # in place, same size
    assert content_hash.file_digest(weights) == "fresh" and reads == [weights]


def test_model_specs_and_yaml_files_name_their_local_paths(tmp_path, tiny):
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(f"backend: vllm\nmodel: {tiny}\noutput_dir: {tmp_path}\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"teacher: {teacher}\ncache_dir: {tmp_path}\nlimit: 3\n")
    assert list(content_hash.named_inputs(f"hf:{tiny}")) == [tiny]
    assert list(content_hash.named_inputs(f"vllm:{tiny}")) == [tiny]
    assert list(content_hash.named_inputs(str(config))) == [config, teacher, tiny], "outputs and caches are not inputs"
    assert list(content_hash.named_inputs("openai:gpt-4o-mini@http://127.0.0.1:9/v1")) == []
    assert list(content_hash.named_inputs("")) == []


def test_a_stage_reading_a_model_through_a_vllm_spec_reruns_when_its_weights_change(tmp_path, tiny):
    model = shutil.copytree(tiny, tmp_path / "model")
    s = stage("feedback", {"student": f"vllm:{model}", "cache_dir": str(tmp_path / "cache")})
    before = fingerprint(s)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "responses.db").write_text("grows with every run")
    assert fingerprint(s) == before, "the response cache is not an input"
    same_size_new_weights(model)
    assert fingerprint(s) != before


def test_a_recipe_whose_teacher_mapping_names_a_local_model_reruns_when_the_weights_change(tmp_path, tiny, capsys):
    from distill.cli import main

    model = shutil.copytree(tiny, tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What color is the {t}?"}) + "\n" for t in ("sky", "sun")))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
work_dir: {tmp_path}/run
teacher:
  backend: transformers
  model: {model}
  device: cpu
stages:
  - name: answers
    command: generate
    input: {prompts}
    output: {tmp_path}/run/answers.jsonl
    max_tokens: 4
    cache_dir: {tmp_path}/cache
    quiet: true
""")
    assert main(["run", str(recipe)]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert main(["run", str(recipe)]) == 0
    assert "done already (unchanged): skipped" in capsys.readouterr().out

    same_size_new_weights(model)
    answers = load_recipe(recipe).stages[0]
    assert str(model) not in answers.argv, "the model is named only inside the saved teacher file"
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "skipped" not in out and "done in" in out, out

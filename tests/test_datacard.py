"""Dataset cards: written from records and rejects, and read back by `datasets`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from synth.datacard import write_data_card
from synth.records import Provenance, Reject, SFTExample


def test_card_counts_reasons_and_loads_with_datasets(tmp_path):
    folder = tmp_path / "labeled"
    folder.mkdir()
    data = folder / "data.jsonl"
    prov = Provenance(teacher="transformers:embedded", method="label", template="label/cot", template_hash="abc", params={"n": 4}, task="t")
    data.write_text("".join(SFTExample(id=f"r{i}", prompt="q", completion="a", provenance=prov).model_dump_json() + "\n" for i in range(3)))
    rejects = [Reject(task="t", reason="sample 2: wrong answer (got 3, expected 4)"), Reject(task="u", reason="wrong answer (got 1, expected 2)"), Reject(task="v", reason="truncated")]
    (folder / "data.rejects.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rejects))

    card = write_data_card(data, inputs=["data/gsm8k/train.jsonl"])
    text = card.read_text()
    assert "- kept: 3" in text and "- rejected: 3" in text
    assert "  - wrong answer: 2" in text and "  - truncated: 1" in text
    assert "teacher: `transformers:embedded`" in text and "template: `label/cot`" in text
    assert "MIT (GSM8K" in text

    from datasets import load_dataset

    ds = load_dataset(str(folder), split="train")
    assert ds.num_rows == 3 and json.loads(json.dumps(ds[0]["provenance"]))["method"] == "label"


def test_tagged_reasons_of_multi_stage_jobs_group_by_their_kind():
    from synth.datacard import _reason_kind

    assert _reason_kind("[round 1] sample 1: truncated: the reply hit max_tokens (no JSON found)") == "truncated"
    assert _reason_kind("[round 3] filtered: too short (2 words)") == "filtered"
    assert _reason_kind("sample 2: wrong answer (got 3, expected 4)") == "wrong answer"


def _dataset(folder, rows: list[str]):
    """A folder holding data.jsonl (SFT records whose completions are `rows`), a rejects file and our card."""
    folder.mkdir(parents=True, exist_ok=True)
    prov = Provenance(teacher="openai:echo@http://127.0.0.1:1/v1", method="generate", task="t")
    data = folder / "data.jsonl"
    data.write_text("".join(SFTExample(id=f"{folder.name}-{i}", prompt="q", completion=text, provenance=prov).model_dump_json() + "\n"
                            for i, text in enumerate(rows)))
    (folder / "data.rejects.jsonl").write_text(Reject(task="x", reason="refused").model_dump_json() + "\n")
    write_data_card(data)
    return folder


def _completions(folder, cache):
    from datasets import load_dataset

    return load_dataset(str(folder), split="train", cache_dir=str(cache))["completion"]


def test_two_folders_of_the_same_name_load_their_own_rows_from_one_datasets_cache(tmp_path):
    # Before the card's config name carried the data's hash, b loaded a's rows: `datasets` keyed
    # both folders as ("labeled", "default") in its cache.
    cache = tmp_path / "hf-datasets"
    a = _dataset(tmp_path / "a" / "labeled", ["row of a"])
    b = _dataset(tmp_path / "b" / "labeled", ["row of b", "another row of b"])
    assert _completions(a, cache) == ["row of a"]
    assert _completions(b, cache) == ["row of b", "another row of b"], "b served from a's cache entry"
    assert _completions(a, cache) == ["row of a"]


def test_a_folder_whose_data_changed_loads_the_new_rows(tmp_path):
    cache = tmp_path / "hf-datasets"
    folder = _dataset(tmp_path / "labeled", ["old answer"])
    assert _completions(folder, cache) == ["old answer"]
    _dataset(folder, ["new answer", "second new answer"])  # a rerun rewrites the data and its card
    assert _completions(folder, cache) == ["new answer", "second new answer"]


def test_the_card_never_replaces_a_readme_it_did_not_write(tmp_path):
    import pytest

    from synth.errors import ConfigError

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    (folder / "data.jsonl").write_text(SFTExample(id="r", prompt="q", completion="a", provenance=Provenance(teacher="t", method="m", task="t")).model_dump_json() + "\n")
    with pytest.raises(ConfigError, match="README.md that blackbox-distill did not write"):
        write_data_card(folder / "data.jsonl")
    assert (folder / "README.md").read_text() == "# my notes\n"
    # Our own card (this version's, or one written before the mark existed) is rewritten.
    (folder / "README.md").write_text("---\nconfigs: []\n---\n\n# data\n\nSynthetic sft data written by blackbox-distill: 1 records in `data.jsonl`.\n")
    write_data_card(folder / "data.jsonl")
    write_data_card(folder / "data.jsonl")
    assert "- kept: 1" in (folder / "README.md").read_text()


def test_the_suite_keeps_every_cache_out_of_the_users_home():
    import datasets
    import huggingface_hub.constants as hub

    from distill.content_hash import kept_digests_path
    from synth.teachers.cache import default_cache_dir
    from tests.conftest import SESSION_HOME

    home = Path.home().resolve()
    places = (datasets.config.HF_DATASETS_CACHE, hub.HF_HOME, hub.HF_HUB_CACHE, default_cache_dir(), kept_digests_path(), os.environ["MPLCONFIGDIR"])
    for where in places:
        resolved = Path(where).resolve()
        assert resolved.is_relative_to(SESSION_HOME.resolve()), f"{where} is outside the session's temp dir"
        assert not resolved.is_relative_to(home / ".cache"), where


def test_trainers_read_each_file_as_its_own_rows_with_no_datasets_cache(tmp_path):
    # Trainers, eval and KD read records through to_hf_dataset (in memory): no cache entry can be
    # shared between two files of the same name.
    from synth.io import to_hf_dataset

    a = _dataset(tmp_path / "a" / "labeled", ["row of a"])
    b = _dataset(tmp_path / "b" / "labeled", ["row of b"])
    for folder, rows in ((a, ["row of a"]), (b, ["row of b"])):
        ds = to_hf_dataset(folder / "data.jsonl")
        assert list(ds["completion"]) == rows and ds.cache_files == []


def test_a_recipe_rerun_with_new_inputs_loads_the_new_rows(tmp_path, fault_server):
    # As a user meets it: two recipes each write a folder named `labeled`, and one is rerun on other prompts.
    from tests.reliability.harness import run_cli

    cache = tmp_path / "hf-datasets"

    def recipe(name: str, prompts: list[str]) -> Path:
        inputs = tmp_path / f"{name}.prompts.jsonl"
        inputs.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nwork_dir: {tmp_path}/{name}\nteacher: openai:echo@{fault_server.base_url}\nstages:\n"
                        f"  - name: label\n    command: generate\n    input: {inputs}\n    output: {tmp_path}/{name}/labeled/data.jsonl\n"
                        "    quiet: true\n")
        result = run_cli("run", str(path), cache=tmp_path / "responses")
        assert result.returncode == 0, result.stderr
        return tmp_path / name / "labeled"

    from datasets import load_dataset

    def loaded(folder):
        return [m[-1]["content"] for m in load_dataset(str(folder), split="train", cache_dir=str(cache))["messages"]]

    def written(folder):
        return [json.loads(line)["messages"][-1]["content"] for line in (folder / "data.jsonl").read_text().splitlines()]

    quick = recipe("quickstart", ["first question"])
    kd = recipe("kd", ["second question", "third question"])
    assert loaded(quick) == written(quick) and len(loaded(quick)) == 1 and "first question" in loaded(quick)[0]
    assert loaded(kd) == written(kd) and len(loaded(kd)) == 2
    recipe("quickstart", ["a changed question", "and one more"])
    assert loaded(quick) == written(quick) and len(loaded(quick)) == 2 and any("changed question" in a for a in loaded(quick))



def test_a_recipe_stage_whose_folder_holds_a_users_readme_stops_before_any_work(tmp_path, fault_server):
    from tests.reliability.harness import run_cli

    folder = tmp_path / "run" / "labeled"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# notes I keep here\n")
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text('{"prompt": "a question"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: r\nwork_dir: {tmp_path}/run\nteacher: openai:echo@{fault_server.base_url}\nstages:\n"
                      f"  - name: label\n    command: generate\n    input: {inputs}\n    output: {folder}/data.jsonl\n    quiet: true\n")
    result = run_cli("run", str(recipe), cache=tmp_path / "responses")
    assert result.returncode == 1 and "README.md that blackbox-distill did not write" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and fault_server.received == 0
    assert (folder / "README.md").read_text() == "# notes I keep here\n" and sorted(p.name for p in folder.iterdir()) == ["README.md"]

"""Dataset cards: written from records and rejects, and read back by `datasets`."""

from __future__ import annotations

import json

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

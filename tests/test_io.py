"""JSON Lines input errors, the crash-safe journal, record formats and the TRL export."""

from __future__ import annotations

import json

import pytest

from synth.errors import InputError
from synth.generators.raw import PromptInput
from synth.io import load_records, read_jsonl, to_hf_dataset
from synth.journal import TaskJournal
from synth.layout import rejects_path
from synth.records import (
    PreferencePair,
    Provenance,
    Reject,
    SFTExample,
    SoftLabels,
    stable_id,
)
from synth.records import Message

PROV = Provenance(teacher="t", method="m", task="task")


def write(path, text: bytes | str):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_read_names_file_line_and_field(tmp_path):
    p = write(tmp_path / "in.jsonl", '{"prompt": "a"}\n\n{"prompt": 3}\n')
    with pytest.raises(InputError, match=r"in\.jsonl:3: field 'prompt': Input should be a valid string"):
        list(read_jsonl(p, PromptInput))


def test_read_errors(tmp_path):
    cases = {
        "bad.jsonl": ('{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl:2: invalid JSON"),
        "missing.jsonl": ('{"text": "a"}\n', r"missing\.jsonl:1: needs a 'prompt' string or a 'messages' list"),
        "empty.jsonl": ("\n  \n", r"empty\.jsonl: file is empty"),
        "bytes.jsonl": (b'{"prompt": "\xff"}\n', r"bytes\.jsonl:1: not UTF-8 text \(byte 0xff"),
        "list.jsonl": ("[1, 2]\n", r"list\.jsonl:1: expected a JSON object"),
        "role.jsonl": ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"role\.jsonl:1: field 'messages\.0\.role'"),
    }
    for name, (content, pattern) in cases.items():
        with pytest.raises(InputError, match=pattern):
            list(read_jsonl(write(tmp_path / name, content), PromptInput))
    with pytest.raises(InputError, match="no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_read_accepts_a_bom(tmp_path):
    p = write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"prompt": "hi"}\n')
    assert [item.prompt for _, item in read_jsonl(p, PromptInput)] == ["hi"]


def record(i: int) -> SFTExample:
    return SFTExample(id=f"r{i}", prompt=f"p{i}", completion=f"c{i}", provenance=PROV)


def test_journal_resumes_after_a_cut_line_and_retries_teacher_failures(tmp_path):
    out = tmp_path / "out.jsonl"
    j = TaskJournal(out)
    assert j.open() == set()
    j.add("t1", [record(1)], [])
    assert j.add("t2", [], [Reject(task="t2", reason="HTTP 503", error=True)]) is True
    j.add("t3", [], [Reject(task="t3", reason="not JSON")])
    j.close()
    with j.path.open("a") as fh:  # what a kill -9 mid-write leaves
        fh.write('{"task": "t4", "records": [{"id": "r4", "pro')
    assert not out.exists()

    j2 = TaskJournal(out)
    assert j2.open() == {"t1", "t3"}
    j2.add("t2", [record(2)], [])
    j2.add("t4", [record(4)], [])
    assert j2.finalize() == (3, 1)
    assert not j2.path.exists()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["r1", "r2", "r4"]
    rejects = [json.loads(line) for line in rejects_path(out).read_text().splitlines()]
    assert [r["task"] for r in rejects] == ["t3"]


def test_records_validate_and_export_in_trl_columns(tmp_path):
    with pytest.raises(ValueError, match="needs messages, or both prompt and completion"):
        SFTExample(id="x", prompt="only a prompt", provenance=PROV)
    with pytest.raises(ValueError, match="top_logprobs has 1 positions"):
        SoftLabels(tokenizer="t", tokens=["a", "b"], top_logprobs=[[-0.1]])
    chat = SFTExample(
        id="c", messages=[Message(role="user", content="hi"), Message(role="assistant", content="yo")], provenance=PROV
    )
    assert chat.to_trl() == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}

    out = tmp_path / "pairs.jsonl"
    pair = PreferencePair(id="p", prompt="q", chosen="good", rejected="bad", score_chosen=9, score_rejected=2, provenance=PROV)
    out.write_text(pair.model_dump_json() + "\n")
    ds = to_hf_dataset(out)
    assert ds.column_names == ["id", "prompt", "chosen", "rejected"]
    assert ds[0]["chosen"] == "good"

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(pair.model_dump_json() + "\n" + record(1).model_dump_json() + "\n")
    with pytest.raises(InputError, match="mixes record formats"):
        to_hf_dataset(mixed)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "preference", "id": "p", "prompt": "q", "chosen": "a", "provenance": {"teacher": "t", "method": "m", "task": "x"}}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1: field 'rejected': Field required"):
        list(load_records(bad))


def test_plain_trl_rows_made_elsewhere_train_as_they_are(tmp_path):
    chat = [{"role": "user", "content": "q"}]
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": chat, "chosen": "good", "rejected": "bad", "source": "hub"}) + "\n"
                     + json.dumps({"id": "two", "prompt": "q2", "chosen": "g", "rejected": "b"}) + "\n")  # fmt: skip
    with pytest.raises(InputError, match=r"plain\.jsonl:2: mixes text and chat messages in one column"):
        to_hf_dataset(plain)
    plain.write_text(plain.read_text().replace('"prompt": "q2"', '"prompt": [{"role": "user", "content": "q2"}]'))
    ds = to_hf_dataset(plain)
    assert ds.column_names == ["id", "prompt", "chosen", "rejected"] and ds["id"] == ["line-1", "two"]
    assert ds[0]["prompt"] == chat and ds[1]["chosen"] == "g"
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": chat + [{"role": "assistant", "content": "a"}]}) + "\n")
    assert to_hf_dataset(sft).column_names == ["id", "messages"]
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"prompt": "q", "chosen": "good"}) + "\n")
    with pytest.raises(InputError, match=r"half\.jsonl:1: neither a distill record .* \(got chosen, prompt\)"):
        to_hf_dataset(half)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "q", "completion": ""}) + "\n")
    with pytest.raises(InputError, match=r"empty\.jsonl:1: field 'completion': expected text"):
        to_hf_dataset(empty)


def test_stable_ids_depend_on_every_part():
    assert stable_id({"a": 1}, "m") == stable_id({"a": 1}, "m")
    assert stable_id({"a": 1}, "m") != stable_id({"a": 2}, "m")
    assert stable_id({"a": 1}, "m") != stable_id({"a": 1}, "n")

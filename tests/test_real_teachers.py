"""What real teachers send that the embedded one never does: reasoning, refusals, filtered and cut-off answers,
reasoning models' parameter rules, provider error bodies. Each case runs against tests/fault_server.py
answering in that provider's documented shape; `distill` runs as a user runs it (a subprocess).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synth.generators.base import with_reasoning
from synth.generators.label import LabelGenerator, LabelOptions, LabelInput, decide
from synth.records import Message, SFTExample, Provenance
from synth.teachers import ChatRequest, PermanentTeacherError, SamplingParams, TeacherSettings
from synth.teachers.base import ChatResponse, Completion, TokenLogprob
from synth.teachers.openai_api import OpenAITeacher
from synth.teachers.reasoning import split_reasoning
from tests.fault_server import REFUSAL, THINKING, fault_server


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=env, timeout=120)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def prompts(path: Path, *texts: str) -> Path:
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def generate(server, tmp_path: Path, *flags: str, texts=("What is 2+2?", "Name a river."), out="out.jsonl") -> tuple[subprocess.CompletedProcess, list, list]:
    inp = prompts(tmp_path / "in.jsonl", *texts)
    output = tmp_path / out
    args = ["generate", "--teacher", f"openai:r1@{server.base_url}", "--input", str(inp), "--output", str(output), "--quiet", *flags]
    done = run_cli(*args, cache=tmp_path / "cache")
    return done, rows(output), rows(output.with_name(output.stem + ".rejects.jsonl"))


def teacher(server, **settings) -> OpenAITeacher:
    cfg = dict(backend="openai", model="m", base_url=server.base_url, timeout=5.0, max_retries=1, backoff_base=0.01, backoff_max=0.02)
    return OpenAITeacher(TeacherSettings(**{**cfg, **settings}))


def ask(t: OpenAITeacher, *requests: ChatRequest):
    async def go():
        try:
            return await t.generate(list(requests))
        finally:
            await t.aclose()

    return asyncio.run(go())


def chat(text: str, **params) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], params=SamplingParams(**params))


# --- reasoning teachers ---------------------------------------------------------------------------------


def test_r1_reasoning_content_is_kept_in_its_own_field_and_counted(tmp_path):
    """DeepSeek-R1's shape: the answer in content, the thinking in reasoning_content, its tokens in usage."""
    with fault_server(reasoning="reasoning_content") as server:
        done, records, rejects = generate(server, tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(records) == 2 and not rejects
    for rec in records:
        assert rec["reasoning"] == THINKING.format(last=rec["messages"][-2]["content"])
        answer = rec["messages"][-1]["content"]
        assert answer.startswith("echo: ") and "<think>" not in answer and "Let me think" not in answer
    thinking_words = sum(len(THINKING.format(last=t).split()) for t in ("What is 2+2?", "Name a river."))
    assert f"({thinking_words} of them reasoning)" in done.stdout


@pytest.mark.parametrize("field", ["reasoning", "inline"])
def test_openrouter_reasoning_and_an_inline_think_block_give_the_same_record(tmp_path, field):
    with fault_server(reasoning=field) as server:
        done, records, _ = generate(server, tmp_path, texts=("What is 2+2?",))
    assert done.returncode == 0, done.stderr
    (rec,) = records
    assert rec["reasoning"] == THINKING.format(last="What is 2+2?")
    assert rec["messages"][-1]["content"].startswith("echo: What is 2+2?")


def test_reasoning_inline_writes_the_r1_distill_target_and_drop_trains_on_the_answer(tmp_path):
    with fault_server(reasoning="reasoning_content") as server:
        done, inlined, _ = generate(server, tmp_path, "--reasoning", "inline", texts=("What is 2+2?",))
        assert done.returncode == 0, done.stderr
        done, dropped, _ = generate(server, tmp_path, "--reasoning", "drop", texts=("What is 2+2?",), out="drop.jsonl")
        assert done.returncode == 0, done.stderr
        sent = server.completed
    thinking = THINKING.format(last="What is 2+2?")
    (rec,) = inlined
    assert rec["messages"][-1]["content"].startswith(f"<think>\n{thinking}\n</think>\n\necho: What is 2+2?")
    assert rec.get("reasoning") is None
    (rec,) = dropped
    assert rec.get("reasoning") is None and rec["messages"][-1]["content"].startswith("echo: ")
    assert sent == 1, "the mode shapes records only: the second run is answered from the cache"


def test_split_reasoning():
    assert split_reasoning("<think>\nhm\n</think>\n\nAnswer: 4") == ("hm", "Answer: 4", 21)
    assert split_reasoning("hm</think>\nA") == ("hm", "A", 11), "R1 templates put <think> in the prompt"
    assert split_reasoning("<think>cut off here") == ("cut off here", "", 19)
    assert split_reasoning("plain answer") == (None, "plain answer", 0)



def test_a_think_block_in_a_servers_text_keeps_logprobs_for_the_answer_only():
    """A server without a reasoning parser: the thinking comes in the text, and its logprobs with it."""
    with fault_server(reasoning="inline") as server:
        [res] = ask(teacher(server), chat("What is 2+2?", logprobs=2))
    (c,) = res.completions
    assert c.reasoning == THINKING.format(last="What is 2+2?") and c.text.startswith("echo: What is 2+2?")
    assert "".join(t.token for t in c.logprobs) == c.text, "the soft labels spell the answer, not the thinking"


def test_answers_are_extracted_from_the_answer_never_the_reasoning():
    gen = LabelGenerator(LabelOptions(n=1, keep="all"), "t")
    task = gen.make_task(LabelInput(question="What is 2+2?", answer="4"), "in:1")
    response = ChatResponse(completions=[Completion(text="So: 2+2.\nAnswer: 4", reasoning="Maybe 5?\nAnswer: 5", finish_reason="stop")])
    (sample,) = gen.samples(task, task.request, response)
    assert sample.answer == "4" and sample.reasoning == "Maybe 5?\nAnswer: 5"
    (record,) = decide([sample], LabelOptions(n=1), gen.checker).records
    assert record.reasoning == "Maybe 5?\nAnswer: 5" and record.meta["verified"] is True
    inlined = with_reasoning(record, "inline")
    assert inlined.completion[0].content == "<think>\nMaybe 5?\nAnswer: 5\n</think>\n\nSo: 2+2.\nAnswer: 4"


def test_with_reasoning_shapes_every_sft_form():
    prov = Provenance(teacher="t", method="m", task="x")
    msgs = SFTExample(id="a", messages=[Message(role="user", content="q"), Message(role="assistant", content="A")], reasoning="R", provenance=prov)
    text = SFTExample(id="b", prompt="q", completion="A", reasoning="R", provenance=prov)
    assert with_reasoning(msgs, "inline").messages[-1].content == "<think>\nR\n</think>\n\nA"
    assert with_reasoning(text, "inline").completion == "<think>\nR\n</think>\n\nA"
    assert with_reasoning(text, "drop").reasoning is None and with_reasoning(text, "drop").completion == "A"
    assert with_reasoning(text, "keep") is text


# --- answers that are not answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("refusal", "refused: " + REFUSAL),
        ("content_filter", "content filter: the provider withheld the answer"),
        ("tool_calls", "tool call instead of an answer"),
    ],
)
def test_an_answer_that_is_not_one_is_a_reject_with_its_reason_and_is_not_paid_twice(tmp_path, fault, reason):
    with fault_server() as server:
        done, records, rejects = generate(server, tmp_path, texts=("Fine question", f"Bad question !fault={fault}"))
        assert done.returncode == 0, done.stderr
        assert [r["messages"][-1]["content"] for r in records] == ["echo: Fine question #c0"]
        (reject,) = rejects
        assert reject["reason"] == f"sample 0: {reason}" and not reject["error"]
        if fault == "refusal":
            assert reject["raw"] == [REFUSAL], "the refusal text is kept"
        received = server.received
        again, _, rejects_again = generate(server, tmp_path, texts=("Fine question", f"Bad question !fault={fault}"))
        assert again.returncode == 0 and server.received == received, "the refusal is cached as what it is: a rerun pays nothing"
        assert rejects_again == rejects
        refreshed, _, _ = generate(server, tmp_path, "--refresh", texts=("Fine question", f"Bad question !fault={fault}"))
        assert refreshed.returncode == 0 and server.received == received + 2, "--refresh asks again"


def test_an_empty_answer_and_a_cut_off_one_are_not_training_examples(tmp_path):
    with fault_server(reasoning="reasoning_content") as server:
        # max_tokens 3 cuts every answer ("echo: …" is longer): a truncated answer is no SFT target.
        done, records, rejects = generate(server, tmp_path, "--max-tokens", "3", texts=("one two three four",))
        assert done.returncode == 0, done.stderr
        assert not records and "truncated: the answer hit max_tokens (3)" in rejects[0]["reason"]
        kept, records, _ = generate(server, tmp_path, "--max-tokens", "3", "--keep-truncated", texts=("one two three four",), out="kept.jsonl")
        assert kept.returncode == 0 and records[0]["meta"]["finish_reason"] == "length"
    cut = Completion(text="", reasoning="thinking and thinking", finish_reason="length")
    assert cut.not_an_answer() == "cut off while reasoning: max_tokens ran out before the answer"
    assert Completion(text=" \n", finish_reason="stop").not_an_answer() == "empty answer"


def test_every_generator_family_rejects_a_refusal_before_parsing_it():
    """The screen is in Generator.outcome, which the runner calls for every method."""
    from synth.generators.curate.stages import QuestionAnswerGenerator, QuestionInput
    from synth.generators.raw import PromptInput, RawGenerator
    from synth.prompts import load_template

    refused = ChatResponse(completions=[Completion(text="", refusal=REFUSAL, finish_reason="stop")])
    raw = RawGenerator(SamplingParams(), "t")
    curate = QuestionAnswerGenerator(SamplingParams(), "t", load_template("curate/answer", "en"))
    label = LabelGenerator(LabelOptions(n=1), "t")
    cases = [(raw, PromptInput(prompt="hi")), (curate, QuestionInput(question="What is 2+2?", meta={"cell": "c"})), (label, LabelInput(question="2+2?", answer="4"))]
    for gen, item in cases:
        task = gen.make_task(item, "in:1")
        out = gen.outcome(task, task.request, refused, final=False)
        assert not out.records and out.resample == 0, type(gen).__name__
        assert [r.reason.split(": ", 1)[1] for r in out.rejects] == ["refused: " + REFUSAL], type(gen).__name__


# --- reasoning models' parameters -------------------------------------------------------------------------


def test_an_o_series_400_is_learned_once_and_the_job_goes_on(tmp_path):
    with fault_server(reasoning_model=True) as server:
        done, records, rejects = generate(server, tmp_path, "--temperature", "0.3", texts=("a", "b", "c"))
        bodies = server.bodies
    assert done.returncode == 0, done.stderr
    assert len(records) == 3 and not rejects
    for param in ("max_tokens", "temperature", "top_p"):
        assert done.stderr.count(f"the model refuses '{param}'") == 1, "said once on stderr"
    last = bodies[-1]
    assert "max_completion_tokens" in last and "max_tokens" not in last and "temperature" not in last and "top_p" not in last
    assert len(bodies) == 3 + 3, "three refusals learned from the first request, then one request per prompt"


def test_a_teacher_file_that_says_reasoning_model_sends_nothing_refused(tmp_path):
    with fault_server(reasoning_model=True) as server:
        t = teacher(server, reasoning_model=True, reasoning_effort="low")
        [res] = ask(t, chat("hello", max_tokens=50))
        (body,) = server.bodies
    assert res.completions[0].text.startswith("echo: hello")
    assert body["max_completion_tokens"] == 50 and body["reasoning_effort"] == "low"
    assert not {"max_tokens", "temperature", "top_p"} & set(body)
    assert t.cache_identity()["reasoning_effort"] == "low", "more thinking gives other answers: another cache key"


def test_the_default_timeout_waits_for_long_reasoning():
    assert TeacherSettings().timeout >= 600


# --- error bodies and the JSON-mode fallback ----------------------------------------------------------------


def test_a_context_length_400_is_a_reject_at_once_and_teaches_no_json_mode():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    with fault_server() as server:
        t = teacher(server)
        [res] = ask(t, chat("long prompt !fault=context*1", json_schema=schema))
        assert isinstance(res, PermanentTeacherError) and "prompt too long for the model's context" in res.reason
        assert server.received == 1, "one request, not one per JSON mode"
        assert t.json_mode_for(schema) is None
        [ok] = ask(t, chat("short prompt", json_schema=schema))
        assert ok.completions and server.bodies[-1]["response_format"]["type"] == "json_schema"


def test_the_json_mode_is_learned_per_schema():
    """OpenAI's strict mode refuses one schema (no additionalProperties: false) and takes another."""
    loose = {"type": "object", "properties": {"echo": {"type": "string"}}}
    strict = {**loose, "required": ["echo"], "additionalProperties": False}
    with fault_server(strict_schemas=True) as server:
        t = teacher(server)
        [a] = ask(t, chat("x", json_schema=loose))
        [b] = ask(t, chat("y", json_schema=strict))
        kinds = [(body.get("response_format") or {}).get("type") for body in server.bodies]
    assert a.completions and b.completions
    assert kinds == ["json_schema", "json_object", "json_schema"]
    assert (t.json_mode_for(loose), t.json_mode_for(strict)) == ("json_object", "json_schema")


def test_two_prompts_with_one_seed_get_different_seeds():
    with fault_server() as server:
        ask(teacher(server), chat("first", seed=0), chat("second", seed=0))
        seeds = sorted(body["seed"] for body in server.bodies)
    assert seeds[0] != seeds[1] and seeds[1] - seeds[0] != 1


# --- against the real llama.cpp server -----------------------------------------------------------------------


def test_an_r1_shaped_server_forwarding_to_llama_cpp(tmp_path, llama_server):
    """The thinking comes in reasoning_content, the answer is llama.cpp's real text: the record keeps both apart."""
    with fault_server(reasoning="reasoning_content", upstream=llama_server) as server:
        done, records, rejects = generate(server, tmp_path, "--temperature", "0", "--max-tokens", "24", texts=("What is the capital of France?",))
    assert done.returncode == 0, done.stderr
    (rec,) = records or rejects
    assert rec["reasoning"].startswith("The user asks: What is the capital of France?")
    answer = rec["messages"][-1]["content"]
    assert answer.strip() and "The user asks" not in answer and "echo:" not in answer


def test_http_soft_labels_carry_the_tokenizer_the_teacher_file_names(tmp_path):
    teacher_file = tmp_path / "teacher.yaml"
    with fault_server() as server:
        teacher_file.write_text(f"backend: openai\nmodel: m\nbase_url: {server.base_url}\ntokenizer: Qwen/Qwen2.5-7B-Instruct\n")
        inp = prompts(tmp_path / "in.jsonl", "hello there")
        out = tmp_path / "out.jsonl"
        done = run_cli("generate", "--teacher", str(teacher_file), "--input", str(inp), "--output", str(out), "--logprobs", "2", "--quiet",
                       cache=tmp_path / "cache")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (rec,) = rows(out)
    assert rec["soft_labels"]["tokenizer"] == "Qwen/Qwen2.5-7B-Instruct"

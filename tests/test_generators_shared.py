"""What the generator families share: one refusal rule, one answer stage, one lenient list reply, declared record kinds."""

from __future__ import annotations

import importlib

import pytest

from synth.filters.refusal import refusal
from synth.generators.answer import AnswerGenerator
from synth.generators.base import Generator
from synth.generators.curate.stages import QuestionAnswerGenerator, QuestionInput, QuestionList, parse_questions
from synth.generators.expand.answer import AnswerInput, InstructionAnswerGenerator, answer_problem
from synth.generators.expand.self_instruct import InstructionList
from synth.generators.feedback.base import failure_reason
from synth.prompts import load_template
from synth.records import SFTExample
from synth.teachers.base import ChatResponse, Completion, SamplingParams


@pytest.mark.parametrize(
    "text",
    ["I'm sorry, I can't.", "  Sorry.", '"I cannot do that."', "I won't rate that.", "I am unable to help.", "As an AI, no.",
     "I apologize, but no.", "As a language model I won't.", "抱歉，不行。", "很抱歉。", "作为一个人工智能，我不能。", "很遗憾，我无法。"],
)
def test_a_reply_that_opens_with_a_refusal_declines(text):
    assert refusal(text)


@pytest.mark.parametrize("text", ['{"questions": ["Sorry?"]}', "Here is the list: sorry, but…", "Sorrow is a topic.", ""])
def test_a_reply_that_does_not_open_with_one_does_not(text):
    assert refusal(text) is None


def test_within_words_finds_the_narrow_phrases_anywhere_in_a_short_reply_only():
    assert refusal("Well, I'm sorry, but that is not possible.", within_words=80) == "I'm sorry"
    assert refusal("I can't stress enough how good rivers are.", within_words=80) is None, "a bare I can't is not a refusal mid-text"
    long = "Sorry for the wait. " + "Here is a detailed explanation of the water cycle and its stages. " * 10
    assert refusal(long, within_words=80) is None


def test_every_family_names_a_refusal_by_the_one_rule():
    text = "I am unable to do that."
    assert parse_questions(text, "stop")[1].startswith("refusal")
    assert failure_reason("rating", "j", 0, Completion(text=text, finish_reason="stop"), "no JSON found in the reply").startswith("refused to judge")
    assert answer_problem(text, "stop", min_words=1, refusal_words=80).startswith("refusal")


def _response(text: str, finish: str = "stop") -> ChatResponse:
    return ChatResponse(completions=[Completion(text=text, finish_reason=finish)])


def test_both_answer_stages_share_one_loop_and_keep_their_reasons():
    params = SamplingParams(max_tokens=64)
    curate = QuestionAnswerGenerator(params, "t", load_template("curate/answer", "en"))
    expand = InstructionAnswerGenerator(params, "t", load_template("expand/answer", "en"), method="self-instruct", reason_prefix="answer: ")
    assert isinstance(curate, AnswerGenerator) and isinstance(expand, AnswerGenerator) and curate.emits == expand.emits == "sft"
    c_task = curate.make_task(QuestionInput(question="What is 2+2?", meta={"cell": "c"}), "q:1")
    e_task = expand.make_task(AnswerInput(id="i1", instruction="Name three rivers in Europe."), "i:1")
    for gen, task in ((curate, c_task), (expand, e_task)):
        assert gen.outcome(task, task.request, _response("  "), final=False).resample == 1, "an empty answer is asked again"
        empty = gen.outcome(task, task.request, _response("  "), final=True)
        assert not empty.records and empty.rejects[0].reason == "sample 0: empty answer", "once, then a reject"
        assert not gen.parse(task, task.request, _response("The Danube, the Rhine", "length"), final=False).records
    c_cut = curate.parse(c_task, c_task.request, _response("Four", "length"), final=False).rejects[0].reason
    e_cut = expand.parse(e_task, e_task.request, _response("Danube", "length"), final=False).rejects[0].reason
    assert c_cut == "sample 0: truncated answer: hit max_tokens" and e_cut == "answer: truncated: the answer hit max_tokens"
    (rec,) = expand.parse(e_task, e_task.request, _response("The Danube, the Rhine and the Loire."), final=True).records
    assert isinstance(rec, SFTExample) and rec.meta == {"instruction_id": "i1", "finish_reason": "stop"}
    assert rec.prompt == list(e_task.request.messages)


def test_one_lenient_list_reply():
    assert QuestionList.model_validate(["1. What is 2+2?", {"question": "Why?"}, "<question 3>", 5]).questions == ["What is 2+2?", "Why?"]
    assert [i.instruction for i in InstructionList.model_validate({"tasks": ["Name a river", {"task": "Sort"}]}).instructions] == ["Name a river", "Sort"]
    assert InstructionList.model_validate([]).instructions == []
    assert "list_key" not in QuestionList.model_json_schema()["properties"], "the list key is not a field the teacher sees"


def test_every_generator_declares_the_kind_it_emits():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for family in ("curate.stages", "expand.evol", "expand.self_instruct", "feedback.critique", "feedback.pairwise", "feedback.rate", "label", "raw"):
        importlib.import_module(f"synth.generators.{family}")
    concrete = [g for g in subclasses(Generator) if g.__module__.startswith("synth.") and not g.__name__.startswith("_") and g is not AnswerGenerator]
    assert len(concrete) >= 14
    for g in concrete:
        assert isinstance(getattr(g, "emits", None), str) and g.emits, f"{g.__name__} declares no kind"

"""Labeling: the teacher answers each input with chain-of-thought, n times; answers are checked and voted on.

Two steps, both pure. Sampling turns a response into `LabelSample`s (text, finish
reason, extracted answer). Deciding (`decide`) looks at every sample of one input —
from one teacher or several — and keeps the ones that are verified against the
reference, or that reached the majority answer, as SFT examples in TRL's
conversational prompt/completion form; every other sample becomes a reject with its
reason. `LabelGenerator` does both in `parse` (one teacher, one job);
`SampleGenerator` only samples, so several teachers' samples can be voted on together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.errors import ConfigError, InputError
from synth.filters.verify import (
    Checker,
    end_of_first_answer_line,
    extract_answer,
    get_checker,
    group_answers,
    parse_number,
    reference_answer,
)
from synth.generators.base import Generator, Outcome, Task
from synth.generators.raw import soft_labels_of
from synth.io import read_jsonl
from synth.prompts import load_template
from synth.records import Message, Provenance, Reject, SFTExample, SoftLabels, stable_id
from synth.teachers.base import (
    ChatRequest,
    ChatResponse,
    Completion,
    SamplingParams,
)


class Demonstration(BaseModel):
    """A worked example shown to the teacher (other fields of a JSONL line are ignored)."""

    model_config = ConfigDict(extra="ignore")

    question: str
    answer: str


class LabelOptions(BaseModel):
    """How inputs are labeled: the options of `distill label` that sampling and voting read; every default runs."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field("label/cot", description="Prompt template (method/name under prompts/, or a .jinja file).")
    lang: Literal["en", "zh"] = Field("en", description="Template language.")
    n: int = Field(4, ge=1, description="Samples per input and teacher.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling.")
    max_tokens: int = Field(512, ge=1, description="Longest answer; a sample cut at this length is rejected as truncated (see trim_truncated).")
    trim_truncated: bool = Field(
        True,
        description="A sample cut at max_tokens that had already written its 'Answer: X' line is kept, ending at that line "
        "(small teachers often ramble on after answering); off: every cut sample is rejected.",
    )
    seed: int | None = Field(0, description="Base seed; sample i uses seed+i, so more samples later reuse the first ones.")
    question_field: str = Field("question", description="Input field holding the question.")
    reference_field: str | None = Field("answer", description="Input field holding the reference answer, when an input has one (GSM8K '#### 72' works).")
    instruction: str | None = Field(None, description="Instruction put before the problem.")
    demonstrations: list[Demonstration] | Path | None = Field(None, description="Worked examples for the prompt: a list of {question, answer}, or a JSONL file of them.")
    keep: Literal["verified", "majority", "all", "everything"] = Field(
        "verified",
        description="verified: samples matching the reference (inputs without one are voted on); "
        "majority: the samples that reached the most common answer (and match the reference, if any); "
        "all: every sample with an answer; everything: every sample as the teacher wrote it, cut off or "
        "unanswered too (distilling the teacher's outputs, e.g. for KD).",
    )
    self_consistency: bool = Field(True, description="With keep=verified, vote on inputs without a reference; off keeps all their answered samples.")
    min_agreement: float = Field(0.0, ge=0.0, le=1.0, description="When voting, the majority must hold at least this fraction of all samples.")
    logprobs: int | None = Field(None, ge=1, le=20, description="Store the teacher's top-K logprobs per token (soft labels).")
    checker: str = Field("numeric", description="How answers are compared: numeric, exact, or module:function.")

    def sampling(self) -> SamplingParams:
        """The sampling parameters of every request."""
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
            seed=self.seed, logprobs=self.logprobs,
        )


class LabelInput(BaseModel):
    """Any JSON object with a question field (named by `question_field`)."""

    model_config = ConfigDict(extra="allow")


class LabelSample(BaseModel):
    """One teacher sample for one input, with the answer extracted from it: what voting looks at."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["label_sample"] = "label_sample"
    id: str = Field(description="Stable id of (task, teacher, sample): the id of the SFT example it may become.")
    task: str
    teacher: str
    sample: int
    prompt: list[Message]
    text: str
    reasoning: str | None = None
    finish_reason: str | None = None
    answer: str | None = None
    reference: str | None = None
    soft_labels: SoftLabels | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance


@dataclass
class Decision:
    """What the samples of one input became."""

    records: list[SFTExample] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")
_ANSWER_WORD = {"en": "Answer: ", "zh": "答案："}


def load_demonstrations(value: list[Demonstration] | Path | None, lang: str, template=None) -> list[Demonstration]:
    """The demonstrations as a list, GSM8K answers rewritten to the template's "Answer: X" last line.

    Given the template they go into, one that does not show demonstrations is an error.
    """
    if value is None:
        return []
    if template is not None and "demonstrations" not in template.source:
        raise ConfigError(f"template {template.name!r} does not show demonstrations; use label/cot")
    demos = [d for _, d in read_jsonl(value, Demonstration)] if isinstance(value, Path) else list(value)
    out = []
    for d in demos:
        answer = _GSM8K_CALC.sub("", d.answer).strip()
        answer = re.sub(r"\n?####\s*(.+?)\s*$", lambda m: "\n" + _ANSWER_WORD[lang] + m.group(1), answer)
        out.append(Demonstration(question=d.question.strip(), answer=answer))
    return out


def uses_number_fallback(checker_name: str, reference: str | None) -> bool:
    """Take the last number as the answer only for numeric tasks: numeric checker, numeric (or no) reference."""
    return checker_name == "numeric" and (reference is None or parse_number(reference) is not None)


class LabelGenerator(Generator):
    """Chain-of-thought labeling with one teacher: `parse` samples, checks and votes in one go."""

    method = "label"
    input_model = LabelInput
    emits = "sft"

    def __init__(self, config: LabelOptions, teacher_name: str, tokenizer: str | None = None):
        template = load_template(config.template, config.lang)
        super().__init__(config.sampling(), teacher_name, template)
        self.config = config
        self.tokenizer = tokenizer
        self.checker: Checker = get_checker(config.checker)
        self.demonstrations = load_demonstrations(config.demonstrations, config.lang, template)
        # What shapes the prompt besides the template goes into task ids too.
        self._prompt_key = [config.question_field, config.instruction, [d.model_dump() for d in self.demonstrations]]

    def sample_name(self, sample: int) -> str:
        """"sample 3 of TEACHER", as every label reject names its sample (votes may span teachers)."""
        return f"sample {sample} of {self.teacher_name}"

    def question_of(self, item: BaseModel, where: str) -> str:
        """The input's question; an InputError naming `where` when it has none."""
        name = self.config.question_field
        value = getattr(item, name, None)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: field '{name}': missing or not text")
        return value

    def reference_of(self, item: BaseModel) -> str | None:
        """The input's reference answer, if it has one."""
        name = self.config.reference_field
        return reference_answer(getattr(item, name, None)) if name else None

    def messages(self, item: BaseModel, where: str) -> list[Message]:
        """The template filled with the question, instruction and demonstrations."""
        content = self.template.render(
            where,
            question=self.question_of(item, where),
            instruction=self.config.instruction,
            demonstrations=[d.model_dump() for d in self.demonstrations],
        )
        return [Message(role="user", content=content)]

    def task_id(self, item: BaseModel) -> str:
        """Stable hash of (input, method, template, parameters, question field, instruction, demonstrations)."""
        return stable_id(super().task_id(item), self._prompt_key)

    def samples(self, task: Task, request: ChatRequest, response: ChatResponse) -> list[LabelSample]:
        """Each completion of a response as a LabelSample with its answer extracted."""
        reference = self.reference_of(task.input)
        # Only answers are voted on: a refusal or an empty sample is a reject before this (Generator.outcome).
        return [self.sample_of(task, sample, completion, request.messages, reference) for sample, completion in self.answers(request, response)]

    def sample_of(self, task: Task, index: int, completion: Completion, prompt: list[Message], reference: str | None) -> LabelSample:
        """One completion as a LabelSample."""
        fallback = uses_number_fallback(self.config.checker, reference)
        return LabelSample(
            id=stable_id(task.id, self.teacher_name, index),
            task=task.id,
            teacher=self.teacher_name,
            sample=index,
            prompt=list(prompt),
            text=completion.text,
            reasoning=completion.reasoning,
            finish_reason=completion.finish_reason,
            # Read from the answer alone: a reasoning teacher tries answers out while thinking.
            answer=extract_answer(completion.text, number_fallback=fallback),
            reference=reference,
            soft_labels=soft_labels_of(completion, self.tokenizer),
            input=task.input.model_dump(mode="json", exclude_none=True),
            provenance=self.provenance(task, index),
        )

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Extract, check and vote over this response's samples; kept ones become SFT examples."""
        decision = decide(self.samples(task, request, response), self.config, self.checker)
        return Outcome(records=decision.records, rejects=decision.rejects)


class SampleGenerator(LabelGenerator):
    """Only samples: every completion is kept as a LabelSample, for a later vote across teachers."""

    emits = "label_sample"

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Every sample, answered or not; nothing is rejected here."""
        return Outcome(records=list(self.samples(task, request, response)))


def decide(samples: list[LabelSample], config: LabelOptions, checker: Checker) -> Decision:
    """Keep or reject each sample of one input (all teachers' samples, in a fixed order).

    Ties in a vote go to the answer that appeared first (teacher order, then sample index).
    """
    out = Decision()
    answered: list[LabelSample] = []
    unanswered: list[LabelSample] = []  # kept as they are with keep=everything
    for s in samples:
        if s.finish_reason == "length" and config.trim_truncated:
            s = trim_after_answer(s) or s
        if config.keep == "everything" and (s.finish_reason == "length" or s.answer is None):
            unanswered.append(s)
        elif s.finish_reason == "length":
            out.rejects.append(_reject(s, "truncated"))
        elif s.answer is None:
            out.rejects.append(_reject(s, "no answer"))
        else:
            answered.append(s)
    for s in unanswered:
        meta = {"answer": None, "reference": s.reference, "verified": None, "samples": len(samples), "finish_reason": s.finish_reason}
        out.records.append(_record(s, meta))
    if not answered:
        return out
    reference = answered[0].reference
    groups = group_answers([s.answer for s in answered], checker)
    top = max(groups, key=len)  # first of equal sizes: groups are in order of first appearance
    total = len(samples)
    votes = {answered[g[0]].answer: len(g) for g in groups}
    teacher_votes: dict[str, dict[str, int]] = {}
    group_of: dict[int, list[int]] = {}
    for g in groups:
        for i in g:
            group_of[i] = g
            per = teacher_votes.setdefault(answered[i].teacher, {})
            per[answered[g[0]].answer] = per.get(answered[g[0]].answer, 0) + 1
    voting = config.keep == "majority" or (config.keep == "verified" and reference is None and config.self_consistency)
    leader = answered[top[0]].answer
    for i, s in enumerate(answered):
        verified = None if reference is None else bool(checker(s.answer, reference))
        why = None
        if config.keep not in ("all", "everything"):
            if voting and group_of[i] is not top:
                why = f"minority answer (got {s.answer}, majority {leader})"
            elif voting and len(top) < config.min_agreement * total:
                why = f"low agreement ({len(top)}/{total} < {config.min_agreement:g})"
            elif verified is False:
                why = f"wrong answer (got {s.answer}, expected {reference})"
        if why:
            out.rejects.append(_reject(s, why))
            continue
        meta = {
            "answer": s.answer,
            "reference": reference,
            "verified": verified,
            "votes": votes,
            "teacher_votes": teacher_votes,
            "agreement": round(len(group_of[i]) / total, 4),
            "samples": total,
            "finish_reason": s.finish_reason,
        }
        out.records.append(_record(s, meta))
    return out


def _record(s: LabelSample, meta: dict[str, Any]) -> SFTExample:
    return SFTExample(
        id=s.id,
        prompt=s.prompt,
        completion=[Message(role="assistant", content=s.text)],
        soft_labels=s.soft_labels,
        reasoning=s.reasoning,
        meta=meta,
        provenance=s.provenance,
    )


def trim_after_answer(s: LabelSample) -> LabelSample | None:
    """The sample cut just after its first "Answer: X" line (finish_reason 'answer'), or None if it has none.

    Soft labels are cut at the same token, so KD still sees exactly the teacher's tokens; when the
    token pieces do not spell the text (a byte-level split), the sample is not trimmed.
    """
    end = end_of_first_answer_line(s.text)
    if end is None:
        return None
    soft, text = s.soft_labels, s.text[:end]
    if soft is not None:
        spelled, keep = "", 0
        while keep < len(soft.tokens) and len(spelled) < end:
            spelled += soft.tokens[keep]
            keep += 1
        if not s.text.startswith(spelled) or len(spelled) < end:
            return None
        text = spelled
        soft = soft.model_copy(update={
            name: getattr(soft, name)[:keep]
            for name in ("tokens", "token_ids", "top_tokens", "top_ids", "top_logprobs") if getattr(soft, name) is not None
        })  # fmt: skip
    # The kept text ends with an answer line, so the bare-number fallback is never needed.
    answer = extract_answer(text, number_fallback=False)
    return s.model_copy(update={"text": text, "soft_labels": soft, "finish_reason": "answer", "answer": answer})


def _reject(s: LabelSample, why: str) -> Reject:
    return Reject(task=s.task, reason=f"sample {s.sample} of {s.teacher}: {why}", input=s.input, raw=[s.text])


# "sample 3 of T: wrong answer (got 5, …)", "sample 0 of T: refused: I can't…": the kind is what precedes " (" or ":".
_REASON = re.compile(r"^sample \d+ of \S+: (?P<why>.+?)(?: \(.*|: .*)?$", re.DOTALL)


def reason_kind(reject: Reject | dict) -> str:
    """The kind of a reject for summaries: truncated, no answer, wrong answer, minority answer, low agreement, teacher error."""
    reason = reject.reason if isinstance(reject, Reject) else reject["reason"]
    error = reject.error if isinstance(reject, Reject) else reject.get("error", False)
    if error:
        return "teacher error"
    m = _REASON.match(reason)
    return m.group("why") if m else reason

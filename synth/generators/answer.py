"""The answer stage every synthesis family ends with: a teacher answers a prompt, and each good answer is an SFT example.

A family says what it answers (its input model and template), what makes an answer bad
(`problem`) and how a reject reads (`reject`); the loop is here. Records are TRL's
conversational prompt/completion form, with the teacher's soft labels when a tokenizer is named.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from synth.generators.base import Generator, Outcome, Task
from synth.generators.raw import soft_labels_of
from synth.records import Message, Reject, SFTExample, stable_id
from synth.teachers.base import ChatRequest, ChatResponse, Completion


class AnswerGenerator(Generator):
    """Answers one prompt; a bad answer is rejected, an empty one resampled once first."""

    emits = "sft"
    resample_empty = True

    def __init__(self, params, teacher_name, template, *, tokenizer: str | None = None):
        super().__init__(params, teacher_name, template)
        self.tokenizer = tokenizer

    def problem(self, completion: Completion) -> str | None:
        """Why an answer is not kept, or None; a reason starting "empty" is resampled once."""
        raise NotImplementedError

    def reject(self, task: Task, sample: int, problem: str, raw: str) -> Reject:
        """The reject of one bad answer."""
        raise NotImplementedError

    def prompt(self, task: Task, request: ChatRequest) -> list[Message]:
        """The record's prompt: the chat the teacher answered."""
        return list(request.messages)

    def meta(self, item: BaseModel, completion: Completion) -> dict[str, Any]:
        """The record's meta: the input's, and how the answer finished."""
        return {**item.meta, "finish_reason": completion.finish_reason}

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """One SFT example per good answer."""
        out = Outcome()
        for sample, completion in self.answers(request, response):
            problem = self.problem(completion)
            if problem is not None:
                # Only an empty answer is worth asking again; a truncated, refused or short one would likely repeat.
                out.bad_sample(self.reject(task, sample, problem, completion.text), retry=not final and problem.startswith("empty"))
                continue
            out.records.append(
                SFTExample(
                    id=stable_id(task.id, sample),
                    prompt=self.prompt(task, request),
                    # Unstripped, so it stays aligned with the soft labels' tokens.
                    completion=[Message(role="assistant", content=completion.text)],
                    soft_labels=soft_labels_of(completion, self.tokenizer),
                    reasoning=completion.reasoning,
                    meta=self.meta(task.input, completion),
                    provenance=self.provenance(task, sample),
                )
            )
        return out

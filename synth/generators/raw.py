"""`distill generate`: raw prompts (or a template filled from each input) through a teacher."""

from __future__ import annotations

import json

import jsonschema
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from synth.generators.base import Generator, Outcome, PromptText, Task, Turn, check_chat
from synth.records import Message, Reject, SFTExample, SoftLabels, stable_id
from synth.teachers.base import ChatRequest, ChatResponse, Completion


class PromptInput(BaseModel):
    """A line of `distill generate` input: `messages`, or `prompt` (with an optional `system`)."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    messages: list[Turn] | None = None
    prompt: PromptText | None = None
    system: str | None = None

    _chat = field_validator("messages")(check_chat)

    @model_validator(mode="after")
    def _has_prompt(self) -> "PromptInput":
        if self.messages is None and self.prompt is None:
            raise ValueError("needs a 'prompt' string or a 'messages' list")
        return self


class TemplateInput(BaseModel):
    """Any JSON object: its fields fill the template."""

    model_config = ConfigDict(extra="allow")


def soft_labels_of(completion: Completion, tokenizer: str | None) -> SoftLabels | None:
    """The top-k logprobs of a completion as a compact SoftLabels record, if it has them."""
    if not completion.logprobs:
        return None
    toks = completion.logprobs
    has_ids = all(t.id is not None for t in toks) and all(c.id is not None for t in toks for c in t.top)
    return SoftLabels(
        tokenizer=tokenizer,
        tokens=[t.token for t in toks],
        token_ids=[t.id for t in toks] if has_ids else None,
        top_tokens=None if has_ids else [[c.token for c in t.top] for t in toks],
        top_ids=[[c.id for c in t.top] for t in toks] if has_ids else None,
        top_logprobs=[[c.logprob for c in t.top] for t in toks],
    )


class RawGenerator(Generator):
    """One SFT example per sample: the input chat plus the teacher's answer."""

    method = "generate"
    emits = "sft"

    def __init__(self, params, teacher_name, template=None, system: str | None = None, tokenizer: str | None = None,
                 keep_truncated: bool = False):  # fmt: skip
        super().__init__(params, teacher_name, template)
        self.system = system
        self.tokenizer = tokenizer
        self.keep_truncated = keep_truncated
        self.input_model = TemplateInput if template is not None else PromptInput

    def messages(self, item: BaseModel, where: str) -> list[Message]:
        """The input's chat, or the template rendered with the input's fields."""
        if self.template is not None:
            fields = item.model_dump()
            chat = [Message(role="user", content=self.template.render(where, **fields))]
            system = fields.get("system") or self.system
        else:
            chat = list(item.messages) if item.messages is not None else [Message(role="user", content=item.prompt)]
            system = item.system or self.system
        if system and chat[0].role != "system":
            chat.insert(0, Message(role="system", content=system))
        return chat

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """Each answer becomes a record; one cut at max_tokens is rejected (unless keep_truncated); with a JSON
        schema, invalid samples are resampled once, then rejected."""
        out = Outcome()
        schema = request.params.json_schema
        for sample, completion in self.answers(request, response):
            if completion.finish_reason == "length" and not self.keep_truncated:
                why = f"sample {sample}: truncated: the answer hit max_tokens ({request.params.max_tokens}); raise --max-tokens, or --keep-truncated"
                out.rejects.append(Reject(task=task.id, reason=why, input=_input_of(task), raw=[completion.text]))
                continue
            if schema is not None:
                problem = _schema_problem(completion.text, schema)
                if problem:
                    out.bad_sample(Reject(task=task.id, reason=f"sample {sample}: {problem}", input=_input_of(task), raw=[completion.text]), retry=not final)
                    continue
            out.records.append(
                SFTExample(
                    id=stable_id(task.id, sample),
                    messages=[*request.messages, Message(role="assistant", content=completion.text)],
                    soft_labels=soft_labels_of(completion, self.tokenizer),
                    reasoning=completion.reasoning,
                    meta={"finish_reason": completion.finish_reason, "input": _input_of(task)},
                    provenance=self.provenance(task, sample),
                )
            )
        return out


def _input_of(task: Task) -> dict:
    return task.input.model_dump(mode="json", exclude_none=True)


def _schema_problem(text: str, schema: dict) -> str | None:
    """Why `text` is not JSON matching `schema`, or None when it is."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"JSON does not match the schema: {exc.message}"
    return None

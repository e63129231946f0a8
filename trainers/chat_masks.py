"""Assistant-only labels for `messages` records, under any chat template.

TRL's `assistant_only_loss` needs `{% generation %}` markers in the chat template, which most
templates lack (SmolLM2's, Llama's and Mistral's among them), and patches only the templates
it knows. Here each assistant turn is found by rendering the chat twice with the student's own
template: up to the turn with the generation prompt (what comes before the answer), and up to
the turn's end. The tokens between the two are the answer, its end-of-turn token included;
every other token (system, user and tool turns, the assistant header) is masked. That needs a
template which renders the start of a chat as the start of the whole chat; every row is checked.
"""

from __future__ import annotations

from synth.errors import InputError


def assistant_mask(tokenizer, messages: list[dict], record_id: str = "?") -> tuple[list[int], list[int]]:
    """(the chat's input_ids as TRL tokenizes them, 1 on each assistant turn's tokens and 0 elsewhere)."""
    ids = _render(tokenizer, messages, record_id)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], record_id, add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], record_id)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise InputError(
                f"record {record_id}: the chat template renders the chat up to turn {i + 1} differently from the start of "
                "the whole chat, so its assistant turns cannot be told apart; train on every token (--no-assistant-only-loss) "
                "or give the template {% generation %} markers"
            )
        mask[len(before) : len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def _render(tokenizer, messages: list[dict], record_id: str, **kwargs) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])
    except Exception as exc:  # the template's own error (a raise_exception, a turn it does not accept)
        raise InputError(f"record {record_id}: the chat template cannot render this chat: {exc}") from exc


def with_assistant_masks(dataset, tokenizer, name: str = "train"):
    """`messages` rows as TRL's tokenized rows: `input_ids` and the `assistant_masks` its SFTTrainer turns into labels."""
    def tokenize(example):
        input_ids, mask = assistant_mask(tokenizer, example["messages"], example.get("id", "?"))
        return {"input_ids": input_ids, "assistant_masks": mask}

    return dataset.map(tokenize, remove_columns=["messages"], desc=f"Masking all but the assistant turns of {name} dataset")

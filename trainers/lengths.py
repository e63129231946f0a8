"""How many examples `max_length` cuts: counted before training, printed, and refused above `max_truncated`.

TRL's trainers cut (SFT, DPO, GKD) or drop (reward) what is longer than max_length without a
word. A cut chain of thought loses its answer line and its end token, so the student learns to
ramble on and never stop; when more than a small share would be cut, the run stops instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from synth.errors import InputError
from trainers.settings import TrainSettings

#: What is lost with a long row, by what the trainer does to it.
LOSS = {
    "cut": "a cut answer loses its end and its EOS token",
    "cut from the start": "a chat cut from the start loses its instructions and question",
    "dropped": "a dropped pair is not learned from",
    "skipped": "a skipped prompt is never trained on",
}


def example_lengths(dataset, tokenizer, answers: Sequence[str] = ("completion",)) -> list[int]:
    """The tokens each record takes as TRL's trainers tokenize it (its longest answer, for pairs).

    `messages` is one chat; otherwise `prompt` followed by each column in `answers`
    (("chosen", "rejected") for preference pairs). Chats go through the chat template, text
    gets the EOS token TRL appends.
    """
    if "messages" in dataset.column_names:
        return [len(_tokens(tokenizer, chat)) for chat in dataset["messages"]]
    prompts = dataset["prompt"]
    longest = [0] * len(prompts)
    for column in answers:
        for i, (prompt, answer) in enumerate(zip(prompts, dataset[column])):
            longest[i] = max(longest[i], len(_tokens(tokenizer, prompt, answer)))
    return longest


def _tokens(tokenizer, prompt, answer=None) -> list[int]:
    if isinstance(prompt, list):
        chat = prompt + (answer or [])
        return list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + (answer or "")
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text=text)["input_ids"]


def check_truncation(lengths: list[int], config: TrainSettings, what: str = "examples", fate: str = "cut") -> int:
    """Print how many of `lengths` exceed max_length; an InputError, before any training, when more than max_truncated do.

    Returns that count. `what` names the rows and `fate` (a key of LOSS) what the trainer does to a long one.
    """
    long = [n for n in lengths if n > config.max_length]
    line = f"{what} longer than max_length={config.max_length} tokens: {len(long)} of {len(lengths)}"
    print(line + (f", {fate} (the longest has {max(long)})" if long else ""), flush=True)
    if long and len(long) > config.max_truncated * len(lengths):
        raise InputError(
            f"{config.data}: {len(long)} of {len(lengths)} {what} ({len(long) / len(lengths):.0%}) are longer than "
            f"max_length={config.max_length} tokens and would be {fate} (the longest has {max(long)}); {LOSS[fate]}. "
            f"That is more than max_truncated={config.max_truncated:g} allows: raise --max-length to "
            f"{max(long)} (max_length: in a config file or recipe), or --max-truncated to accept the loss"
        )
    return len(long)

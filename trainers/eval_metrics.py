"""The measurements behind `distill eval`: greedy answers, teacher-forced NLL, answer checks, judge verdicts.

Pure functions over a loaded Hugging Face model and tokenizer, or over text: the
orchestration (teachers, cache, files) lives in trainers/evaluate.py.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from synth.errors import ConfigError
from synth.filters.verify import Checker, extract_answer, parse_number
from trainers.common import loading

Messages = list[dict[str, str]]


def load_local(path: Path, device: str, dtype: Any, trust_remote_code: bool = False):
    """(model, tokenizer) from a local directory, in eval mode, with a pad token and a chat template checked."""
    hf_logging.disable_progress_bar()
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    with loading(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: the tokenizer has no chat template, so prompts cannot be formatted for it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with loading(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a chat prompt ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes any BOS/special tokens itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(model, tokenizer) -> list[int]:
    """Every token id that ends an answer: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def _left_pad(rows: Sequence[list[int]], pad_id: int, device: str):
    """(input_ids, attention_mask, position_ids) of left-padded rows; positions count real tokens only."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def generate_greedy(model, tokenizer, prompts: Sequence[Messages], max_new_tokens: int, batch_size: int) -> list[str]:
    """Each prompt's greedy answer, generated in left-padded batches of similar length."""
    device = model.device
    encoded = [prompt_ids(tokenizer, m) for m in prompts]
    stops = stop_ids(model, tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask, _ = _left_pad([encoded[i] for i in batch], tokenizer.pad_token_id, device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            )  # fmt: skip
        for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
            row = row[: next((t for t, x in enumerate(row) if x in stops), len(row))]  # cut at the answer's end
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) of one completion and its token and byte counts."""

    total: float
    tokens: int
    bytes: int

    @property
    def per_token(self) -> float:
        """Mean NLL per token (nan for an empty completion)."""
        return self.total / self.tokens if self.tokens else math.nan


def completion_nll(model, tokenizer, prompts: Sequence[Messages], completions: Sequence[tuple[str, bool]], batch_size: int) -> list[NLL]:
    """Teacher-forced NLL of each (text, ended) completion after its prompt, over completion tokens only.

    The text is tokenized with this model's tokenizer; a completion that ended on its own
    (not cut at max tokens) also scores the end-of-answer token, so stopping is measured too.
    """
    device = model.device
    rows = []
    for messages, (text, ended) in zip(prompts, completions):
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ended and tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        rows.append((prompt_ids(tokenizer, messages), target, len(text.encode("utf-8"))))
    # Left padding puts every completion at the end, so only the last positions need logits.
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    results: list[NLL] = [NLL(0.0, 0, 0)] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = [i for i in order[start : start + batch_size] if rows[i][1]]
        for i in order[start : start + batch_size]:
            results[i] = NLL(0.0, 0, rows[i][2])
        if not batch:
            continue
        ids, mask, positions = _left_pad([rows[i][0] + rows[i][1] for i in batch], tokenizer.pad_token_id, device)
        longest = max(len(rows[i][1]) for i in batch)
        extra = {"logits_to_keep": longest + 1} if takes_keep else {}
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits
        logits = logits[:, -(longest + 1) : -1]  # position t predicts token t+1
        for b, i in enumerate(batch):
            target = torch.tensor(rows[i][1], device=device)
            n = len(target)
            total = F.cross_entropy(logits[b, -n:].float(), target, reduction="sum").item()
            results[i] = NLL(total, n, rows[i][2])
    return results


def mean_nll(values: Sequence[NLL]) -> dict[str, float | int | None]:
    """Token-weighted NLL per token, NLL per byte (tokenizer-independent) and the counts."""
    tokens = sum(v.tokens for v in values)
    total = sum(v.total for v in values)
    size = sum(v.bytes for v in values)
    return {
        "nll": total / tokens if tokens else None,
        "nll_per_byte": total / size if size else None,
        "nll_tokens": tokens,
    }


def gap_closed(before: float | None, after: float | None, floor: float | None) -> float | None:
    """(before − after) / (before − floor): 1 when the student reaches the teacher's NLL, 0 when it has not moved."""
    if before is None or after is None or floor is None or not before - floor > 0:
        return None
    return (before - after) / (before - floor)


def answer_of(text: str, checker_name: str, reference: str | None) -> str | None:
    """The final answer of a reply; the last number counts as one only for numeric tasks (as labeling does)."""
    fallback = checker_name == "numeric" and (reference is None or parse_number(reference) is not None)
    return extract_answer(text, number_fallback=fallback)


def same(checker: Checker, a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are the same answer (a missing one never is)."""
    return a is not None and b is not None and bool(checker(a, b))


def rate(flags: Sequence[bool]) -> float | None:
    """The fraction of True, or None when there is nothing to count."""
    return sum(flags) / len(flags) if flags else None


JUDGE_PROMPT = """You are comparing two answers to the same question.

Question:
{question}

Answer A:
{a}

Answer B:
{b}

Which answer is better: more correct, more helpful and clearer? Reply with one letter only: A or B."""

# "A", "**B**", "(A).", "Answer: B", "Verdict - A": the letter alone (end of line or punctuation after it).
_LEADING = re.compile(
    r"^[\s*_\"'`(\[]*(?:(?:answer|option|verdict|winner)\s*[:=-]?\s*)?\(?([AB])\)?[*_]*(?=\s*$|[.,:;!)\]\n])",
    re.IGNORECASE,
)
# "Answer B is better", "response (A) wins".
_NAMED = re.compile(r"\b(?:answer|option|response)\s+\(?([AB])\)?(?![\w'])", re.IGNORECASE)


def judge_verdict(reply: str) -> str | None:
    """'A', 'B', or None when the reply names neither or both (junk counts as no verdict)."""
    m = _LEADING.match(reply)
    if m:
        return m.group(1).upper()
    named = {x.upper() for x in _NAMED.findall(reply)}
    return named.pop() if len(named) == 1 else None


def combine_verdicts(student_first: str | None, teacher_first: str | None) -> str:
    """'win', 'loss' or 'tie' for the student from the two orders; inconsistent or missing verdicts tie."""
    first = {"A": "win", "B": "loss"}.get(student_first or "")
    second = {"B": "win", "A": "loss"}.get(teacher_first or "")
    return first if first is not None and first == second else "tie"


def win_rate(outcomes: Sequence[str]) -> dict[str, float | int | None]:
    """Wins, ties, losses and the win rate counting a tie as half."""
    wins, ties, losses = (sum(o == k for o in outcomes) for k in ("win", "tie", "loss"))
    n = len(outcomes)
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "ties": ties, "losses": losses}


def summarize(items, answered, teacher_answer, teacher_nll, models, checker) -> list[dict[str, Any]]:
    """One row of metrics per model (models as trainers/evaluate.py collects them)."""
    before = next((m for m in models if m["role"] == "before"), None)
    before_nll = mean_nll(list(before["nll_values"].values()))["nll"] if before else None
    floor = teacher_nll["nll"] if teacher_nll else None
    rows = []
    for m in models:
        nll = mean_nll(list(m["nll_values"].values()))
        refs = [i for i, it in enumerate(items) if it.reference]
        row = {
            "name": m["name"], "path": m["path"], "role": m["role"],
            "accuracy": rate([same(checker, m["answers"][i], items[i].reference) for i in refs]),
            "accuracy_n": len(refs),
            "agreement": rate([same(checker, m["answers"][i], teacher_answer[i]) for i in answered if teacher_answer[i]]),
            "agreement_n": sum(1 for i in answered if teacher_answer[i]),
            "answered": rate([a is not None for a in m["answers"]]),
            **nll,
            "nll_gap": None if nll["nll"] is None or floor is None else nll["nll"] - floor,
            "gap_closed": gap_closed(before_nll, nll["nll"], floor) if before else None,
        }  # fmt: skip
        if "judge" in m:
            row["judge"] = win_rate([v["outcome"] for v in m["judge"].values()])
        rows.append(row)
    return rows


def item_record(i: int, item, teacher_text: dict, teacher_answer: dict, models: list[dict]) -> dict[str, Any]:
    """Everything about one prompt: the teacher's and each model's answer, NLL and judge outcome."""
    per_model = {}
    for m in models:
        value = m["nll_values"].get(i)
        per_model[m["name"]] = {
            "text": m["texts"][i],
            "answer": m["answers"][i],
            "nll": None if value is None or not value.tokens else value.per_token,
            "judge": m.get("judge", {}).get(i),
        }
    return {
        "id": item.id, "question": item.question, "reference": item.reference,
        "teacher": {"text": teacher_text.get(i), "answer": teacher_answer.get(i)},
        "models": per_model,
    }  # fmt: skip

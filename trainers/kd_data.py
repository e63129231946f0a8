"""Soft labels for KD: read from the records, proved to share the student's vocabulary, aligned row by row.

The teacher's top-k logprobs travel WITH each example: after TRL tokenizes a row, the
row's own soft labels are looked up by its record id and stored in the row as
`kd_start` (the index in input_ids of the first completion token) and `kd_ids` /
`kd_logprobs` (one list of k candidates per completion token). The collator pads them
into (batch, length, k) tensors at the positions of the tokens they predict. Shuffling,
gradient accumulation and several GPUs move rows, never the labels inside a row.

A row is used only where the student's own tokenization of the completion equals the
teacher's generated tokens (ids where the backend gave ids, token strings otherwise);
other rows are skipped and counted, and if none is left the error says why.

HTTP backends store candidate token strings without ids: each is mapped to the student
token that decodes to exactly that string. Strings no single token decodes to (partial
UTF-8 bytes, ambiguous pieces) are dropped from the candidates, so their probability
mass lands in the tail bucket instead of being lost or misassigned. Their records name
the tokenizer the teacher file's `tokenizer:` gives; records that name none are refused
unless --teacher-tokenizer names it or --token-strings-only accepts the strings alone.

A student whose chat template renders the prompts unlike the teacher (another default
system prompt, other special tokens) gets a one-line warning: the soft labels align on
the completion, but the student would learn them after a context the teacher never saw.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from datasets import List, Value
from transformers import AutoTokenizer

from synth.errors import ConfigError, InputError
from synth.io import load_records
from synth.paths import cache_home
from synth.teachers.embedded import EMBEDDED_MODEL_NAME, EMBEDDED_TOKENIZER_NAME

KD_COLUMNS = ["kd_start", "kd_ids", "kd_logprobs"]
#: The skip reason of a row whose text was cut inside a multi-byte character (saved with U+FFFD by older versions or a server).
CUT_CHARACTER = "cut inside a multi-byte character"
#: Tokenizers we know by vocabulary hash, so a student is checked against them without their files.
KNOWN_VOCABS = {EMBEDDED_TOKENIZER_NAME: "1e1f19caccf1afb4"}
#: Prompts whose rendering by the student's chat template is compared with the teacher's.
PROMPT_SAMPLES = 8


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of (token, id) over the whole vocabulary, added tokens included."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_tokenizer(tokenizer, table: SoftTable, path: Path | str, teacher_tokenizer: str | None = None,
                    token_strings_only: bool = False) -> str:  # fmt: skip
    """Refuse a student whose vocabulary differs from the teacher's; say how the match was established.

    A derived student carries its teacher's tokenizer files under another directory name,
    so names are not compared: vocabulary hashes are. Soft labels that name no tokenizer
    (an HTTP teacher whose file has no `tokenizer:`) are refused unless --teacher-tokenizer
    names it or --token-strings-only says the token strings are enough.
    """
    named = sorted(n for n in table.tokenizers if n)
    if len(named) > 1:
        raise InputError(f"the soft labels come from several tokenizers ({', '.join(named)}); KD needs one teacher vocabulary")
    if table.nameless and not teacher_tokenizer and not token_strings_only:
        raise ConfigError(
            f"{path}: the soft labels of {table.nameless} of {table.labelled} records name no tokenizer (an HTTP teacher), so the "
            "student's vocabulary cannot be checked against the teacher's; set `tokenizer:` in the teacher file and label again, "
            "pass --teacher-tokenizer DIR, or pass --token-strings-only to map each candidate token string to the student's "
            "vocabulary and skip the rows whose tokens do not match"
        )
    source = teacher_tokenizer or (named[0] if named else None)
    if source is None:
        return ("the records name no tokenizer and --token-strings-only is set: candidate strings are mapped to the student's "
                "vocabulary and each row is checked against the student's tokenization")  # fmt: skip
    mine = vocab_fingerprint(tokenizer)
    if source == "embedded":
        source = EMBEDDED_TOKENIZER_NAME
    if source in KNOWN_VOCABS:
        theirs = KNOWN_VOCABS[source]
    elif Path(source).expanduser().is_dir():
        theirs = vocab_fingerprint(AutoTokenizer.from_pretrained(str(Path(source).expanduser()), local_files_only=True))
    elif source == tokenizer.name_or_path:
        return f"same tokenizer name {source!r}"
    else:
        raise ConfigError(
            f"the soft labels were made with tokenizer {source!r}, which is not a directory here, so the student's "
            "vocabulary cannot be checked against it; pass --teacher-tokenizer DIR (a directory with the teacher's tokenizer files)"
        )
    if theirs != mine:
        raise ConfigError(
            f"the student's tokenizer ({tokenizer.name_or_path}: {len(tokenizer)} tokens, vocabulary hash {mine}) is not "
            f"the teacher's ({source}: vocabulary hash {theirs}); top-k KD compares token ids, so the student must use "
            "the teacher's tokenizer (derive it from the teacher, or train on the text with `distill train sft`)"
        )
    return f"vocabulary hash {mine} equals the teacher's ({source})"


@dataclass
class SoftRow:
    """One record's soft labels, compact: (n, k) arrays, -1 where a candidate is missing or unmapped."""

    token_ids: list[int] | None  # the teacher's generated ids; None when the backend gave strings only
    tokens: list[str]
    top_ids: Any
    top_logprobs: Any


@dataclass
class SoftTable:
    """Every record's soft labels by record id, and what reading them found."""

    rows: dict[str, SoftRow] = field(default_factory=dict)
    tokenizers: set[str | None] = field(default_factory=set)
    records: int = 0
    labelled: int = 0  # records with soft labels
    nameless: int = 0  # of which name no tokenizer
    systemless: int = 0  # of which have a chat prompt without a system message
    unmapped: int = 0  # candidate strings no single student token decodes to
    teachers: set[str] = field(default_factory=set)  # provenance.teacher of the labelled records
    prompts: list[tuple[str, list[dict]]] = field(default_factory=list)  # (id, chat prompt) of the first labelled ones


def token_pieces(tokenizer) -> list[str]:
    """The text each token id decodes to on its own (what backends report as a token string)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def read_soft_labels(path: Path, tokenizer, max_positions: int) -> SoftTable:
    """Soft labels of every SFT record at `path`, mapped to the student's ids, at most `max_positions` per record."""
    table = SoftTable()
    reverse: dict[str, int] | None = None
    vocab = len(tokenizer)
    for record in load_records(path):
        table.records += 1
        soft = getattr(record, "soft_labels", None)
        if soft is None or (soft.top_ids is None and soft.top_tokens is None):
            continue
        n = min(len(soft.tokens), max_positions)
        if soft.top_ids is not None:
            candidates = soft.top_ids[:n]
        else:
            if reverse is None:
                reverse = _unique_pieces(token_pieces(tokenizer))
            candidates = [[reverse.get(t, -1) for t in row] for row in soft.top_tokens[:n]]
            table.unmapped += sum(i < 0 for row in candidates for i in row)
        k = max((len(row) for row in candidates), default=0)
        ids = np.full((n, max(k, 1)), -1, dtype=np.int32)
        lps = np.zeros((n, max(k, 1)), dtype=np.float32)
        for j, (row, values) in enumerate(zip(candidates, soft.top_logprobs[:n])):
            seen: set[int] = set()
            for c, (i, v) in enumerate(zip(row, values)):
                if i >= vocab:
                    raise InputError(f"{path}: record {record.id}: candidate id {i} is outside the student's vocabulary ({vocab} tokens)")
                if i >= 0 and i not in seen:  # a repeated candidate would count its mass twice
                    seen.add(i)
                    ids[j, c], lps[j, c] = i, v
        row = SoftRow(list(soft.token_ids[:n]) if soft.token_ids is not None else None, soft.tokens[:n], ids, lps)
        old = table.rows.get(record.id)
        if old is not None and not (np.array_equal(old.top_ids, ids) and np.array_equal(old.top_logprobs, lps)):
            raise InputError(f"{path}: two records share the id {record.id} but not their soft labels; ids must be unique")
        table.rows[record.id] = row
        table.tokenizers.add(soft.tokenizer)
        table.labelled += 1
        table.nameless += soft.tokenizer is None
        table.teachers.add(record.provenance.teacher)
        prompt = _chat_prompt(record)
        if prompt is not None:
            table.systemless += not prompt or prompt[0]["role"] != "system"
            if len(table.prompts) < PROMPT_SAMPLES:
                table.prompts.append((record.id, prompt))
    if not table.rows:
        raise InputError(
            f"{path}: no record has soft_labels (the teacher's top-k logprobs); generate with --logprobs K "
            "from a teacher that returns them, or train on the text with `distill train sft`"
        )
    return table


def _chat_prompt(record) -> list[dict] | None:
    """The chat turns before the answer the record's soft labels describe; None for a plain-text prompt."""
    if record.messages is not None:
        return [m.model_dump() for m in record.messages[:-1]]
    if isinstance(record.prompt, list):
        return [m.model_dump() for m in record.prompt]
    return None


def render_prompt(tokenizer, messages: list[dict]) -> str | None:
    """The text a chat template makes of `messages` up to the answer (what the model sees before it), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that refuses these roles: nothing to compare
        return None


def default_system_prompt(tokenizer, messages: list[dict]) -> str | None:
    """The system prompt the chat template adds to `messages` (which have none), or None if it adds none.

    Found by rendering them as they are and with a system message of our own, then removing
    ours: where the template injects a default (Qwen2.5's "You are Qwen, ..."), the first
    rendering is the second with that default inserted at one place.
    """
    mark = "\u2063kd-system\u2063"
    bare = render_prompt(tokenizer, messages)
    own = render_prompt(tokenizer, [{"role": "system", "content": mark}, *messages])
    if bare is None or own is None or mark not in own:
        return None
    own = own.replace(mark, "")
    if len(bare) <= len(own):  # ours adds a system turn: the template adds none of its own
        return None
    start = next((i for i, (a, b) in enumerate(zip(bare, own)) if a != b), len(own))
    end = 0
    while end < len(own) - start and bare[len(bare) - 1 - end] == own[len(own) - 1 - end]:
        end += 1
    if start + end != len(own):
        return None
    extra = bare[start : len(bare) - end].strip()
    return extra if any(c.isalnum() for c in extra) else None


def _teacher_chat_tokenizer(source: str):
    """The teacher's tokenizer with a chat template, where its files are on this machine without converting anything; else None."""
    if source in ("embedded", EMBEDDED_TOKENIZER_NAME):
        directory = cache_home() / "models" / EMBEDDED_MODEL_NAME  # converted already by the teacher or an embedded student
    else:
        directory = Path(source).expanduser()
    if not (directory / "tokenizer_config.json").is_file():
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception:  # noqa: BLE001 - a warning's input, never a reason to stop
        return None
    return tok if getattr(tok, "chat_template", None) else None


def prompt_rendering_warning(tokenizer, table: SoftTable, teacher_tokenizer: str | None = None) -> str | None:
    """One line saying how the student's chat template renders the records' prompts unlike the teacher, or None.

    KD aligns the soft labels on the completion tokens only: a student whose template renders
    the prompt differently (another default system prompt, other special tokens) learns the
    teacher's distributions after a context the teacher never saw. What is cheap to detect:
    with the teacher's tokenizer files here (a directory the records or --teacher-tokenizer
    name, or the converted embedded model), the first prompts rendered by both templates;
    when the records name no tokenizer (an HTTP teacher), whether the student's template adds
    a default system prompt to prompts that have none.
    """
    if not table.prompts:
        return None
    named = sorted(n for n in table.tokenizers if n)
    source = teacher_tokenizer or (named[0] if len(named) == 1 else None)
    teachers = ", ".join(sorted(table.teachers)) or "unknown"
    if source is not None:
        teacher = _teacher_chat_tokenizer(source)
        if teacher is None:  # its template is not here (the student's own tokenizer name, or embedded not converted)
            return None
        for record_id, prompt in table.prompts:
            theirs, mine = render_prompt(teacher, prompt), render_prompt(tokenizer, prompt)
            if theirs is None or mine is None or theirs == mine:
                continue
            at = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
            at = max(theirs.rfind("\n", 0, at) + 1, at - 30)  # from the start of that line, where short
            return (f"KD: the student's chat template renders the prompts unlike the teacher's tokenizer ({source}): record {record_id} "
                    f"differs from character {at}: teacher {theirs[at : at + 60]!r}, student {mine[at : at + 60]!r}; the soft labels "
                    "still align on the completion, but the student learns them after a context the teacher never saw")  # fmt: skip
        return None
    prompt = next((p for _, p in table.prompts if not p or p[0]["role"] != "system"), None)
    default = default_system_prompt(tokenizer, prompt) if prompt is not None else None
    if default is None:
        return None
    shown = default if len(default) <= 80 else default[:77] + "..."
    return (f"KD: the student's chat template ({tokenizer.name_or_path}) adds the default system prompt {shown!r} to prompts "
            f"without one ({table.systemless} of {table.labelled} records); the teacher ({teachers}) rendered them with a template "
            "KD cannot see (--teacher-tokenizer DIR compares them): if it added no such prompt, the student learns the soft labels "
            "after a context the teacher never saw")  # fmt: skip


def _unique_pieces(pieces: list[str]) -> dict[str, int]:
    """piece -> id for the pieces exactly one token decodes to."""
    counts = Counter(pieces)
    return {p: i for i, p in enumerate(pieces) if counts[p] == 1}


def as_prompt_completion(dataset):
    """`messages` rows as prompt (all turns but the last) and completion (the last, assistant, turn)."""
    if dataset is None or "messages" not in dataset.column_names:
        return dataset

    def split_last(example):
        messages = example["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise InputError(f"record {example.get('id')}: KD needs the last message to be the assistant's answer")
        return {"prompt": messages[:-1], "completion": messages[-1:]}

    return dataset.map(split_last, remove_columns=["messages"], desc="Splitting messages into prompt/completion")


def attach_soft_labels(dataset, table: SoftTable, tokenizer, name: str = "train"):
    """The tokenized dataset with each row's soft labels in KD_COLUMNS, rows that cannot align dropped; and the counts."""
    if "kd_ids" in dataset.column_names:  # prepared already (evaluate() prepares again)
        return dataset, Counter()
    state: dict[str, Any] = {}

    def piece(i: int) -> str:
        if "pieces" not in state:
            state["pieces"] = token_pieces(tokenizer)
        return state["pieces"][i]

    features = dataset.features.copy()
    features.update(
        kd_start=Value("int32"), kd_ids=List(List(Value("int32"))), kd_logprobs=List(List(Value("float32"))), kd_status=Value("string")
    )
    # An explicit fingerprint: hashing the table to make one would cost more than the map.
    ds = dataset.map(
        lambda ex: align_row(ex, table.rows.get(ex["id"]), piece), features=features, new_fingerprint=uuid.uuid4().hex,
        desc=f"Attaching soft labels to {name} dataset",
    )  # fmt: skip
    statuses = ds["kd_status"]
    counts = Counter(s.split(":")[0] for s in statuses)
    kept = ds.filter(lambda s: s == "ok", input_columns="kd_status", new_fingerprint=uuid.uuid4().hex).remove_columns("kd_status")
    if len(kept) == 0:
        first = next(s for s in statuses if s != "ok")
        hint = "Is the student's tokenizer the teacher's?"
        if set(counts) == {CUT_CHARACTER}:
            hint = ("The teacher's answers were cut at max_tokens inside a multi-byte character and saved with U+FFFD: "
                    "label them again with --refresh (answers are now cut at a character boundary) or a larger --max-tokens.")  # fmt: skip
        raise InputError(f"no {name} row can use its soft labels ({dict(counts)}); first: {first}. {hint}")
    return kept, counts


def align_row(example: dict, soft: SoftRow | None, piece: Callable[[int], str]) -> dict:
    """This row's soft labels placed at its completion tokens, or an empty entry and the reason in kd_status."""
    skip = {"kd_start": 0, "kd_ids": [], "kd_logprobs": []}
    if soft is None:
        return {**skip, "kd_status": "no soft labels"}
    labels, input_ids = example["labels"], example["input_ids"]
    start = next((i for i, x in enumerate(labels) if x != -100), len(labels))
    student = input_ids[start : start + len(soft.tokens)]
    m = len(student)
    if m == 0:
        return {**skip, "kd_status": "completion truncated away"}
    if soft.token_ids is not None:
        bad = next((j for j in range(m) if student[j] != soft.token_ids[j]), None)
        teacher = soft.token_ids
    else:
        bad = next((j for j in range(m) if piece(student[j]) != soft.tokens[j]), None)
        teacher = soft.tokens
    if bad is not None and all("\ufffd" in t for t in soft.tokens[bad:]):
        # Not a tokenizer mismatch: the text ends in U+FFFD where the teacher's tokens are a character's first bytes.
        return {**skip, "kd_status": f"{CUT_CHARACTER}: record {example.get('id')} from completion token {bad} (its text ends in U+FFFD)"}
    if bad is not None:
        return {**skip, "kd_status": f"tokens differ: record {example.get('id')} at completion token {bad}: "
                f"teacher {teacher[bad]!r} ({soft.tokens[bad]!r}), student {student[bad]} ({piece(student[bad])!r})"}  # fmt: skip
    return {"kd_start": start, "kd_ids": soft.top_ids[:m].tolist(), "kd_logprobs": soft.top_logprobs[:m].tolist(), "kd_status": "ok"}


@dataclass
class KDCollator:
    """TRL's collator, plus (batch, length, k) `kd_ids` / `kd_logprobs` at the positions of the tokens they describe."""

    base: Callable

    def __call__(self, examples: list[dict]) -> dict:
        """Pad the row-aligned soft labels to the batch's length (-1: no candidate)."""
        batch = self.base(examples)
        if "attention_mask" not in batch:
            raise ConfigError("KD needs padded batches: padding-free and packed batches are not supported")
        rows, length = batch["input_ids"].shape
        k = max((len(e["kd_ids"][0]) for e in examples if e["kd_ids"]), default=1)
        ids = torch.full((rows, length, k), -1, dtype=torch.long)
        lps = torch.zeros((rows, length, k), dtype=torch.float32)
        for b, example in enumerate(examples):
            start, top = example["kd_start"], example["kd_ids"]
            m = min(len(top), length - start)
            if m <= 0:
                continue
            width = len(top[0])
            ids[b, start : start + m, :width] = torch.tensor(top[:m], dtype=torch.long)
            lps[b, start : start + m, :width] = torch.tensor(example["kd_logprobs"][:m], dtype=torch.float32)
        batch["kd_ids"], batch["kd_logprobs"] = ids, lps
        return batch


def completion_ids(tokenizer, prompt, completion) -> list[int]:
    """The completion's token ids as a teacher with this tokenizer would have generated them (up to the end token).

    Tokenized as TRL's SFTTrainer does (chat template for message lists), so records built
    from these ids align with the student. For tests, benchmarks and white-box teachers.
    """
    if isinstance(prompt, list):
        def encode(messages, **kw):
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

        head = encode(prompt, add_generation_prompt=True)
        full = encode(prompt + completion)
    else:
        head = tokenizer(text=prompt)["input_ids"]
        full = tokenizer(text=prompt + completion)["input_ids"]
    tail = full[len(head):]
    end = next((j for j, t in enumerate(tail) if t == tokenizer.eos_token_id), len(tail))
    return tail[:end]

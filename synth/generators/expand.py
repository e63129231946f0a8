"""Expansion, the parts Self-Instruct and Evol-Instruct share: the pool, instruction filters, answers, rejects.

Self-Instruct lives in expand_selfinstruct.py, Evol-Instruct in expand_evol.py. Both end
with the answer stage here: each kept instruction is answered by the teacher and becomes
an SFT example in TRL's conversational prompt/completion form (prompt = the chat the
teacher answered, completion = [its assistant message]).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.errors import InputError
from synth.filters.dedup import DedupStats, normalize, tokenize
from synth.generators.base import Generator, Outcome, PromptText, Task
from synth.generators.raw import soft_labels_of
from synth.io import read_jsonl
from synth.layout import rejects_path, write_jsonl_atomic
from synth.job import JobSummary
from synth.paths import resource_dir
from synth.records import Reject, SFTExample, stable_id
from synth.teachers.base import ChatRequest, ChatResponse, Message

#: Self-Instruct's list of tasks a text model cannot do, and their Chinese counterparts.
NON_TEXT_WORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                  "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
                  "图片", "图像", "画一", "绘制", "视频", "音频", "音乐", "流程图", "示意图"]  # fmt: skip

# Phrases of a reply that declines; a long reply mentioning "sorry" once is usually a real answer.
_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|sorry, but|i apologi[sz]e|i cannot|i can'?t (help|assist|provide|do)|i am unable|"
    r"i'?m unable|i'?m not able|as an ai|as a language model|as an artificial intelligence)\b"
    r"|抱歉|对不起|很遗憾|我无法|我不能|作为一个?(ai|人工智能|语言模型)",
    re.IGNORECASE,
)
_STOP = set("a an the and or but of to in on at for with by is are was were be been it this that these those i you he she we "
            "they me my your our their as so if then than there here do does did not no yes ok okay".split())


class PoolItem(BaseModel):
    """An instruction in the pool: a seed (Self-Instruct's format or {instruction, input?, output?}) or a new one."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    instruction: PromptText
    input: str = ""
    output: str = ""

    @model_validator(mode="before")
    @classmethod
    def _seed_format(cls, value: Any) -> Any:
        # Self-Instruct's seed_tasks.jsonl keeps input/output in `instances`.
        if isinstance(value, dict) and "instances" in value and "input" not in value:
            first = (value.get("instances") or [{}])[0] or {}
            value = {**value, "input": first.get("input") or "", "output": first.get("output") or ""}
        return value

    def key(self) -> str:
        """The id, or a stable hash of the text when the line has none."""
        return self.id or "pool-" + stable_id(self.instruction, self.input)[:12]

    def prompt_text(self) -> str:
        """The instruction with its input, as one prompt."""
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction


def default_seed_file() -> Path:
    """The 175 Self-Instruct seed tasks shipped in data/."""
    return resource_dir("data") / "self_instruct" / "seed_tasks.jsonl"


def load_pool(path: str | Path | None) -> list[PoolItem]:
    """Pool items from a JSONL file (default: the shipped seed tasks), each with a unique key."""
    path = Path(path) if path is not None else default_seed_file()
    items = [item for _, item in read_jsonl(path, PoolItem)]
    out, seen = [], set()
    for item in items:
        item = item.model_copy(update={"id": item.key()})
        if item.id in seen:
            raise InputError(f"{path}: id {item.id!r} appears twice")
        seen.add(item.id)
        out.append(item)
    return out


# -- filters on instructions and answers ------------------------------------------------------
def length_of(text: str) -> int:
    """Words, counting each Chinese/Japanese character as one."""
    return len(tokenize(normalize(text)))


def instruction_problem(text: str, min_len: int, max_len: int, blocked: list[str]) -> str | None:
    """Why a new instruction is filtered out (a reason starting "filtered:"), or None."""
    stripped = text.strip()
    n = length_of(stripped)
    if n < min_len:
        return f"filtered: too short ({n} words, minimum {min_len})"
    if n > max_len:
        return f"filtered: too long ({n} words, maximum {max_len})"
    if not stripped[0].isalnum():
        return f"filtered: starts with punctuation ({stripped[0]!r})"
    low = stripped.lower()
    for word in blocked:
        w = word.lower()
        hit = re.search(rf"\b{re.escape(w)}\b", low) if w.isascii() else w in low
        if hit:
            return f"filtered: not a text task (mentions {word!r})"
    return None


def is_refusal(text: str, max_words: int = 80) -> bool:
    """A reply that declines: a refusal phrase in a reply shorter than `max_words` (WizardLM's rule)."""
    return bool(_REFUSAL.search(text)) and length_of(text) < max_words


def content_words(text: str) -> int:
    """Tokens that are not punctuation or stop words."""
    return sum(1 for t in tokenize(normalize(text)) if t not in _STOP)


def answer_problem(text: str, finish_reason: str | None, min_words: int, refusal_words: int) -> str | None:
    """Why an answer is not kept (truncated, empty, refusal, too short), or None."""
    if finish_reason == "length":
        return "truncated: the answer hit max_tokens"
    if not text.strip():
        return "empty: the answer is empty"
    if is_refusal(text, refusal_words):
        return "refusal: the answer declines"
    n = content_words(text)
    if n < min_words:
        return f"too short: {n} content words (minimum {min_words})"
    return None


# -- the answer stage -------------------------------------------------------------------------
class AnswerInput(BaseModel):
    """An instruction kept by expansion, to be answered; `meta` rides along into the record."""

    model_config = ConfigDict(extra="forbid")

    id: str
    instruction: str
    input: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)


class AnswerGenerator(Generator):
    """Answers one instruction; problems (truncated, refusal, too short) become rejects, empty ones are resampled once."""

    input_model = AnswerInput

    def __init__(self, params, teacher_name, template, *, method: str, min_words: int = 1, refusal_words: int = 80,
                 tokenizer: str | None = None, reason_prefix: str = ""):  # fmt: skip
        super().__init__(params, teacher_name, template)
        self.method = method
        self.min_words = min_words
        self.refusal_words = refusal_words
        self.tokenizer = tokenizer
        self.reason_prefix = reason_prefix

    def messages(self, item: AnswerInput, where: str) -> list[Message]:
        """The instruction (and its input) through the answer template."""
        return [Message(role="user", content=self.template.render(where, instruction=item.instruction, input=item.input))]

    def parse(self, task: Task, request: ChatRequest, response: ChatResponse, final: bool) -> Outcome:
        """One SFT example per good answer."""
        out = Outcome()
        item: AnswerInput = task.input
        for i, completion in enumerate(response.completions):
            sample = request.sample_offset + i
            problem = answer_problem(completion.text, completion.finish_reason, self.min_words, self.refusal_words)
            if problem is not None:
                # Only an empty answer is worth asking again; a refusal or a short one would likely repeat.
                out.bad_sample(Reject(task=task.id, reason=self.reason_prefix + problem, input=item.model_dump(mode="json"), raw=[completion.text]),
                               retry=not final and problem.startswith("empty"))  # fmt: skip
            else:
                out.records.append(SFTExample(
                    id=stable_id(task.id, sample),
                    prompt=list(request.messages),
                    completion=[Message(role="assistant", content=completion.text)],
                    soft_labels=soft_labels_of(completion, self.tokenizer),
                    meta={**item.meta, "instruction_id": item.id, "finish_reason": completion.finish_reason},
                    provenance=self.provenance(task, sample),
                ))  # fmt: skip
        return out


# -- results ---------------------------------------------------------------------------------
@dataclass
class ExpandResult:
    """What an expansion run wrote, with counts for the summary."""

    output: Path
    rejects: Path
    records: int
    rejected: int
    reasons: Counter
    dedup: DedupStats
    stages: dict[str, JobSummary] = field(default_factory=dict)
    instructions: int = 0
    rounds: int = 0

    @property
    def requests_sent(self) -> int:
        """Requests sent over every stage."""
        return sum(s.requests_sent for s in self.stages.values())

    @property
    def cache_hits(self) -> int:
        """Samples served from the cache over every stage."""
        return sum(s.cache_hits for s in self.stages.values())


def reason_kind(reason: str) -> str:
    """The category of a reject reason: `[stage] kind: detail` → kind."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)
    reason = re.sub(r"^sample \d+:\s*", "", reason)
    return reason.split(":", 1)[0].strip()


def stage_rejects(summary: JobSummary, stage: str) -> list[dict]:
    """A finished job's rejects, each reason prefixed with `[stage]`, in a fixed order (the job's follows completion)."""
    path = summary.rejects
    if not path.is_file() or path.stat().st_size == 0:
        return []
    rows = [{**row, "reason": f"[{stage}] {row['reason']}"} for _, row in read_jsonl(path)]
    return sorted(rows, key=lambda r: (r["task"], r["reason"]))


def tagged(reject: Reject, stage: str) -> dict:
    """A reject made outside a job, as a rejects-file row with its stage."""
    row = reject.model_dump(mode="json", exclude_none=True)
    return {**row, "reason": f"[{stage}] {row['reason']}"}


def write_rejects(output: Path, rows: list[dict]) -> tuple[int, Counter]:
    """The run's one rejects file beside `output`; returns its count and the count per reason kind."""
    write_jsonl_atomic(rejects_path(output), rows)
    return len(rows), Counter(reason_kind(r["reason"]) for r in rows)

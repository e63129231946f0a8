"""What the Self-Instruct and Evol-Instruct pipelines share: the instruction pool, the result, one rejects file.

Every stage's rejects go into the run's one rejects file, each reason prefixed with its
stage (`[round-1] duplicate: ...`), in a fixed order, so a rerun writes the same file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from synth.errors import InputError
from synth.filters.dedup import DedupStats
from synth.generators.base import PromptText
from synth.io import read_jsonl
from synth.job import JobSummary
from synth.layout import rejects_path, write_jsonl_atomic
from synth.paths import resource_dir
from synth.records import Reject, stable_id


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

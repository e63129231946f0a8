"""What a job will ask a teacher and, at most, what it will cost: printed before the first request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from synth.teachers.base import ChatRequest, Prices
from synth.teachers.budget import CHARS_PER_TOKEN
from synth.teachers.cache import request_fingerprint, sample_key


@dataclass
class Estimate:
    """The samples a job asks for, how many the cache holds, and the tokens of the rest (prompt estimated, answers at most)."""

    samples: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _pending: list[tuple[list[str], int, int]] = field(default_factory=list, repr=False)

    def add(self, identity: dict, request: ChatRequest) -> None:
        """Count one task's request (its cache keys are looked up in `settle`)."""
        fp = request_fingerprint(identity, request)
        keys = [sample_key(fp, request.sample_offset + i) for i in range(request.params.n)]
        chars = len(json.dumps([m.model_dump() for m in request.messages], ensure_ascii=False))
        self._pending.append((keys, -(-chars // CHARS_PER_TOKEN), request.params.max_tokens))
        self.samples += len(keys)

    def settle(self, present: set[str]) -> "Estimate":
        """Split the samples into cached and to send, given the keys the cache holds."""
        for keys, prompt, max_tokens in self._pending:
            missing = sum(1 for k in keys if k not in present)
            self.cached += len(keys) - missing
            self.prompt_tokens += prompt * missing
            self.completion_tokens += max_tokens * missing
        self._pending.clear()
        return self

    def all_keys(self) -> list[str]:
        """Every sample key counted so far."""
        return [k for keys, _, _ in self._pending for k in keys]

    def line(self, label: str, prices: Prices) -> str:
        """One line: samples to ask for, tokens, and the most it can cost when prices are known."""
        cost = prices.cost(self.prompt_tokens, self.completion_tokens)
        price = f", at most ${cost:.4f}" if cost is not None else " (no prices in the teacher file: no cost estimate)"
        return (
            f"estimate for {label}: {self.samples - self.cached} samples to ask for ({self.cached} in the cache), "
            f"~{self.prompt_tokens:,} prompt tokens (at ~{CHARS_PER_TOKEN} characters each), "
            f"at most {self.completion_tokens:,} completion tokens{price}"
        )

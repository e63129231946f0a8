"""A spending cap for a command: requests stop before what is spent plus what is in flight would pass it.

Each request reserves its worst case before it is sent (its prompt, estimated at ~4 characters
a token, and `max_tokens` for every sample asked for), and settles at the real price once its
answer arrives. A request whose worst case does not fit is not sent: it fails with
`BudgetReached`, its input becomes a reject that a rerun with a larger budget retries, and
nothing already answered is paid for again (it is in the cache). Answers in flight when the
cap is reached still arrive and are kept.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

from synth.teachers.base import ChatRequest, Prices, TeacherError

#: Characters per prompt token for the worst-case estimate: ~4 for English with BPE vocabularies
#: (code and other languages run denser, which the max_tokens bound of the answer more than covers).
CHARS_PER_TOKEN = 4


class BudgetReached(TeacherError):
    """Not sent: its worst case would pass the budget. Retryable: a rerun with a larger budget sends it."""

    retryable = True


def worst_case(request: ChatRequest, prices: Prices) -> float:
    """The most a request can cost: its prompt (estimated) and max_tokens for each sample."""
    chars = len(json.dumps([m.model_dump() for m in request.messages], ensure_ascii=False))
    prompt = -(-chars // CHARS_PER_TOKEN) * request.params.n  # a server asked n times sends the prompt n times at worst
    return prices.cost(prompt, request.params.max_tokens * request.params.n) or 0.0


@dataclass
class Budget:
    """What a command may spend (USD) and what it has spent and reserved so far, across its stages and teachers."""

    limit: float
    spent: float = 0.0
    reserved: float = 0.0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reserve(self, amount: float) -> bool:
        """Hold `amount` for a request about to be sent; False (nothing held) when it would pass the limit."""
        with self._lock:
            if self.spent + self.reserved + amount > self.limit:
                self.refused += 1
                return False
            self.reserved += amount
            return True

    def settle(self, reserved: float, cost: float) -> None:
        """A request came back (or failed): release its reservation and add what it cost."""
        with self._lock:
            self.reserved = max(0.0, self.reserved - reserved)
            self.spent += cost

    def reason(self) -> str:
        """The reject reason of an input not sent."""
        return f"budget: not sent, it could pass the budget of ${self.limit:g} (${self.spent:.4f} spent)"

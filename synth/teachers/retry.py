"""Retry decisions for remote teachers: what is worth sending again, and how long to wait first.

Only `TransientTeacherError` is retried; a `PermanentTeacherError` (or any other
exception) goes straight back to the caller. The HTTP client's own retries are
switched off, so the budget and the counts in `TeacherStats` are ours alone.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal, Mapping, TypeVar

from synth.teachers.base import PermanentTeacherError, TeacherError, TeacherStats, TransientTeacherError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A server asking for more than this is answered after this long anyway: a
#: misconfigured Retry-After (hours) must not park a whole run.
RETRY_AFTER_CAP = 300.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry a transient failure and how long to wait before each retry."""

    max_retries: int = 6
    base: float = 0.5
    max_delay: float = 30.0
    jitter: Literal["full", "decorrelated"] = "full"
    retry_after_cap: float = RETRY_AFTER_CAP

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        previous: float | None = None,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry).

        Without a Retry-After this is exponential backoff with jitter, never above
        `max_delay`: "full" draws from [0, base * 2**attempt]; "decorrelated" draws
        from [base, 3 * previous]. A server's Retry-After is a floor, honoured even
        above `max_delay` (up to `retry_after_cap`), because retrying earlier only
        earns another 429.
        """
        rng = rng or random
        if self.jitter == "decorrelated":
            prev = previous if previous is not None else self.base
            upper = max(self.base, 3 * prev)
            backoff = min(self.max_delay, rng.uniform(self.base, upper))
        else:
            # min() before the power would overflow on absurd attempt counts.
            ceiling = min(self.max_delay, self.base * 2 ** min(attempt, 60))
            backoff = rng.uniform(0, ceiling)
        if retry_after is not None and retry_after > 0:
            return min(self.retry_after_cap, max(retry_after, backoff))
        return max(0.0, backoff)


def error_for_status(status: int, message: str, headers: Mapping[str, str] | None = None) -> TeacherError:
    """The error an HTTP failure status stands for: 408, 429 and 5xx are transient, other 4xx permanent."""
    if status in (408, 429) or status >= 500:
        return TransientTeacherError(message, status=status, retry_after=parse_retry_after(headers))
    return PermanentTeacherError(message, status=status)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked us to wait: `retry-after-ms`, `retry-after` in seconds, or an HTTP date."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            if name == "retry-after":
                return _parse_http_date(value)
            continue
        if seconds != seconds or seconds < 0:  # NaN or negative: ignore the header
            return None
        return min(seconds, RETRY_AFTER_CAP)
    return None


def _parse_http_date(value: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, min(RETRY_AFTER_CAP, when.timestamp() - time.time()))


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    stats: TeacherStats | None = None,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Await `fn()`, retrying `TransientTeacherError` up to `policy.max_retries` times.

    Each retry adds one to `stats.retries`. When the budget is spent, the last
    transient error is raised; permanent errors are raised at once.
    """
    attempt = 0
    previous: float | None = None
    while True:
        try:
            return await fn()
        except TransientTeacherError as err:
            if attempt >= policy.max_retries:
                raise
            wait = policy.delay(attempt, err.retry_after, previous)
            previous = wait
            attempt += 1
            if stats is not None:
                stats.retries += 1
            log.debug("transient failure (%s); retry %d/%d in %.2fs", err.reason, attempt, policy.max_retries, wait)
            await sleep(wait)

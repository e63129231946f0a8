"""Several OpenAI-compatible endpoints serving one model, used as one: least in flight first, failing ones rested.

A vLLM or SGLang server per GPU, or a provider's regional endpoints: each request goes to the
endpoint with the fewest requests in flight. One that fails `REST_AFTER` times in a row
(5xx, 429, timeouts, dropped connections) is left out for `REST_S` seconds, so retries land on
the others; when every endpoint is resting, the one back soonest is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: Consecutive transient failures after which an endpoint is rested.
REST_AFTER = 3
#: Seconds a failing endpoint is left out of rotation.
REST_S = 30.0


@dataclass
class Endpoint:
    """One base URL, its client (made per event loop by the teacher) and its health."""

    url: str
    query: dict[str, str]
    name: str
    client: Any = None
    in_flight: int = 0
    sent: int = 0
    failures: int = 0
    rested_until: float = 0.0


@dataclass
class EndpointPool:
    """Picks an endpoint per request and keeps each one's record; `say` reports an endpoint put to rest."""

    endpoints: list[Endpoint]
    say: Callable[[str], None] = lambda text: None
    clock: Callable[[], float] = time.monotonic
    rests: int = field(default=0)

    def pick(self) -> Endpoint:
        """The endpoint for the next request: the least busy of those not resting (the soonest back if all are)."""
        now = self.clock()
        ready = [e for e in self.endpoints if e.rested_until <= now]
        if not ready:
            return min(self.endpoints, key=lambda e: e.rested_until)
        return min(ready, key=lambda e: (e.in_flight, e.sent))

    def succeeded(self, endpoint: Endpoint) -> None:
        """An answer arrived: the endpoint's failure run is over."""
        endpoint.failures = 0

    def failed(self, endpoint: Endpoint, why: str) -> None:
        """A transient failure; the `REST_AFTER`th in a row rests the endpoint (if another can take its requests)."""
        endpoint.failures += 1
        if endpoint.failures >= REST_AFTER and len(self.endpoints) > 1:
            endpoint.failures = 0
            endpoint.rested_until = self.clock() + REST_S
            self.rests += 1
            self.say(f"endpoint {endpoint.name} failed {REST_AFTER} times in a row ({why}); resting it for {REST_S:g} s")

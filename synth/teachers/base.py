"""The Teacher protocol and the request/response types every backend shares.

A teacher takes a batch of chat requests and returns, per request, either a
`ChatResponse` with exactly `params.n` completions or a `TeacherError`. Backends
differ only inside `generate`; caching, resume and progress live elsewhere.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from synth.records import Message


class SamplingParams(BaseModel):
    """How to sample; every field except `n` is part of the cache key."""

    # An infinite temperature is not a way to sample: it would reach the server and come back as a bad answer.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature: float = Field(0.7, ge=0.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(512, ge=1)
    n: int = Field(1, ge=1, description="Completions per request.")
    seed: int | None = Field(None, description="Base seed; each request derives its samples' seeds from it (see ChatRequest.sample_seed).")
    stop: list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="Top-k logprobs per generated token.")
    json_schema: dict[str, Any] | None = Field(None, description="Ask for JSON output matching this schema.")

    def cache_fields(self) -> dict[str, Any]:
        """The parameters that change what one sample looks like (all but n)."""
        return self.model_dump(exclude={"n"})



#: Seeds stay below 2**31: llama.cpp reads a 32-bit seed, and some servers a signed one.
SEED_RANGE = 2**31


class ChatRequest(BaseModel):
    """A chat to complete `params.n` times, as samples `sample_offset`, `sample_offset + 1`, …"""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message]
    params: SamplingParams = SamplingParams()
    sample_offset: int = Field(0, ge=0)

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample `index`: a hash of the request (messages and parameters, base seed included) plus `index`.

        Reproducible (a resumed request redraws the same samples), yet two prompts never share
        a random stream as they would with `seed + index`. Consecutive samples get consecutive
        seeds, the rule vLLM and OpenAI-compatible servers apply to the choices of one `n` request.
        """
        if self.params.seed is None:
            return None
        payload = {"messages": [m.model_dump() for m in self.messages], "params": self.params.cache_fields()}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        # Room for 2**20 samples above the base, so `base + index` never wraps (vLLM adds i itself).
        return int(digest[:15], 16) % (SEED_RANGE - 2**20) + index


class TopLogprob(BaseModel):
    """One candidate token at a position. `id` is set where the backend knows token ids."""

    token: str
    id: int | None = None
    logprob: float


class TokenLogprob(BaseModel):
    """The generated token at one position and the top-k candidates there."""

    token: str
    id: int | None = None
    logprob: float
    top: list[TopLogprob] = []


class Completion(BaseModel):
    """One sampled answer: `text` is the answer alone; a reasoning model's thinking is in `reasoning`."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = Field(None, description="Per token of `text` (never of the reasoning).")
    reasoning: str | None = Field(None, description="The chain of thought a reasoning model wrote before its answer.")
    reasoning_tokens: int = Field(0, description="Of completion_tokens, how many were reasoning (where the server says).")
    refusal: str | None = Field(None, description="The model's refusal message, when it declined (OpenAI's `refusal`).")

    def not_an_answer(self) -> str | None:
        """Why this completion is no answer at all (refused, filtered, a tool call, empty), or None when it is one.

        Such a sample is a reject with this reason, never a record; an answer cut at max_tokens
        is still an answer here (each method decides what a truncated one is worth).
        """
        if self.refusal:
            return "refused: " + " ".join(self.refusal.split())[:300]
        if self.finish_reason == "content_filter":
            return "content filter: the provider withheld the answer"
        if self.text.strip():
            return None
        if self.finish_reason in ("tool_calls", "function_call"):
            return "tool call instead of an answer"
        if self.reasoning and self.finish_reason == "length":
            return "cut off while reasoning: max_tokens ran out before the answer"
        if self.finish_reason == "length":
            return "empty answer: cut off at max_tokens"
        return "empty answer"


class Usage(BaseModel):
    """Tokens billed for one request (all its completions)."""

    prompt_tokens: int = 0
    completion_tokens: int = Field(0, description="Every generated token, reasoning included (that is what is billed).")
    reasoning_tokens: int = 0


class ChatResponse(BaseModel):
    """A request's completions, in sample order; `cached[i]` tells whether sample i came from the cache."""

    completions: list[Completion]
    usage: Usage = Usage()
    model: str = ""
    cached: list[bool] = []


class TeacherError(Exception):
    """A request that failed. `retryable` errors may succeed if sent again."""

    retryable: bool = False

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        """A short reason for a rejects file."""
        prefix = f"HTTP {self.status}: " if self.status else ""
        return prefix + self.message


class TransientTeacherError(TeacherError):
    """Rate limits, 5xx, timeouts, dropped connections: worth retrying."""

    retryable = True


class PermanentTeacherError(TeacherError):
    """Bad requests and the like: sending it again will not help."""

    retryable = False


@dataclass
class TeacherStats:
    """Counters a backend keeps, read by the progress line and benchmarks."""

    requests_sent: int = 0
    requests_ok: int = 0
    retries: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Of completion_tokens, those spent reasoning (billed as completion tokens).
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Prices:
    """What a teacher's tokens cost, per million (None: not given)."""

    prompt: float | None = None
    completion: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The cost of these tokens (reasoning tokens are completion tokens), or None without prices."""
        if self.prompt is None and self.completion is None:
            return None
        return (prompt_tokens * (self.prompt or 0) + completion_tokens * (self.completion or 0)) / 1e6


class Capabilities(BaseModel):
    """What an endpoint supports, as probed by `distill teacher check`."""

    n: bool
    logprobs: bool
    json_schema: Literal["json_schema", "json_object", "prompt"]
    latency_s: float | None = None
    notes: list[str] = []


class Teacher(abc.ABC):
    """A model that answers chat requests. Subclasses implement `generate`."""

    #: Backend name: "openai", "transformers" or "vllm".
    backend: str = ""
    #: Requests handed to one `generate` call by the runner.
    batch_size: int = 1
    #: `generate` calls the runner keeps in flight at once.
    concurrency: int = 1
    #: Prices from the teacher's config (see build_teacher).
    prices: Prices = Prices()

    def __init__(self, model: str):
        self.model = model
        self.stats = TeacherStats()

    @property
    def tokenizer_name(self) -> str | None:
        """Name of the tokenizer whose ids appear in logprobs, if the backend has one."""
        return None

    def cache_identity(self) -> dict[str, Any]:
        """What, besides the request, decides a response: part of every cache key."""
        return {"backend": self.backend, "model": self.model}

    @property
    def spec(self) -> str:
        """A short, secret-free name for logs and provenance."""
        return f"{self.backend}:{self.model}"

    @abc.abstractmethod
    async def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Complete each request; the i-th result answers the i-th request, never raising per request."""

    async def capabilities(self) -> Capabilities:
        """Probe what this teacher supports; backends with fixed abilities override this."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections, engines and models."""

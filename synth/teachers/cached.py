"""A teacher that answers from the response cache and asks the real one only for what is missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from synth.teachers.budget import Budget, BudgetReached, worst_case
from synth.teachers.cache import ResponseCache, request_fingerprint, sample_key
from synth.redact import redact
from synth.teachers.base import Capabilities, ChatRequest, ChatResponse, Completion, Teacher, TeacherError, Usage


@dataclass
class CacheStats:
    """Samples served from the cache and samples paid for."""

    hits: int = 0
    misses: int = 0


class CachedTeacher(Teacher):
    """Wraps a teacher: cached samples come from SQLite; the rest are requested and committed on arrival."""

    def __init__(self, inner: Teacher, cache: ResponseCache, budget: Budget | None = None):
        super().__init__(inner.model)
        self.budget = budget
        self.inner = inner
        self.cache = cache
        self.backend = inner.backend
        self.batch_size = inner.batch_size
        self.concurrency = inner.concurrency
        self.prices = inner.prices
        self.stats = inner.stats
        self.cache_stats = CacheStats()
        self._identity = inner.cache_identity()
        # Stored in every cache row: a backend's name must not carry its credentials there.
        self._teacher_name = redact(inner.spec)

    @property
    def tokenizer_name(self) -> str | None:
        """The inner teacher's tokenizer."""
        return self.inner.tokenizer_name

    @property
    def spec(self) -> str:
        """The inner teacher's name."""
        return self.inner.spec

    def cache_identity(self):
        """The inner teacher's identity."""
        return self._identity

    async def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Fill each request's samples from the cache, then fetch the missing runs in one inner call."""
        plans = []
        all_keys: list[str] = []
        for req in requests:
            fp = request_fingerprint(self._identity, req)
            keys = [sample_key(fp, req.sample_offset + i) for i in range(req.params.n)]
            plans.append(keys)
            all_keys.extend(keys)
        found = self.cache.get_many(all_keys)

        # Each contiguous run of missing samples becomes one request for n=run length.
        subrequests: list[ChatRequest] = []
        owners: list[tuple[int, int]] = []  # (request index, first sample position)
        for ri, (req, keys) in enumerate(zip(requests, plans)):
            pos = 0
            while pos < len(keys):
                if keys[pos] in found:
                    pos += 1
                    continue
                end = pos
                while end < len(keys) and keys[end] not in found:
                    end += 1
                if pos == 0 and end == len(keys):
                    subrequests.append(req)  # nothing cached: the common case, sent as is
                else:
                    params = req.params.model_copy(update={"n": end - pos})
                    subrequests.append(req.model_copy(update={"params": params, "sample_offset": req.sample_offset + pos}))
                owners.append((ri, pos))
                pos = end

        fetched: dict[str, tuple[Completion, int]] = {}
        failed: dict[int, TeacherError] = {}
        if subrequests:
            results = await self._send(subrequests)
            to_store = []
            for (ri, pos), result in zip(owners, results):
                if isinstance(result, TeacherError):
                    failed.setdefault(ri, result)
                    continue
                for i, completion in enumerate(result.completions):
                    key = plans[ri][pos + i]
                    fetched[key] = (completion, result.usage.prompt_tokens)
                    to_store.append((key, completion, result.usage.prompt_tokens))
            # Committed before anything else looks at the responses: a crash after this loses nothing.
            self.cache.put_many(self._teacher_name, to_store)

        out: list[ChatResponse | TeacherError] = []
        for ri, keys in enumerate(plans):
            if ri in failed:
                out.append(failed[ri])
                continue
            completions, cached, prompt_tokens = [], [], 0
            for key in keys:
                hit = key in found
                completion, pt = found[key] if hit else fetched[key]
                completions.append(completion)
                cached.append(hit)
                prompt_tokens = max(prompt_tokens, pt)
            self.cache_stats.hits += sum(cached)
            self.cache_stats.misses += len(cached) - sum(cached)
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=sum(c.completion_tokens for c in completions),
                reasoning_tokens=sum(c.reasoning_tokens for c in completions),
            )
            out.append(ChatResponse(completions=completions, usage=usage, model=self.model, cached=cached))
        return out

    async def _send(self, subrequests: list[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """The inner teacher's answers; with a budget, only the requests whose worst case still fits are sent."""
        if self.budget is None:
            return await self.inner.generate(subrequests)
        holds = [worst_case(r, self.prices) for r in subrequests]
        sent = [i for i, hold in enumerate(holds) if self.budget.reserve(hold)]
        results: list[ChatResponse | TeacherError] = [BudgetReached(self.budget.reason()) for _ in subrequests]
        try:
            answers = await self.inner.generate([subrequests[i] for i in sent]) if sent else []
        except BaseException:
            for i in sent:
                self.budget.settle(holds[i], 0.0)
            raise
        for i, answer in zip(sent, answers):
            cost = 0.0 if isinstance(answer, TeacherError) else self.prices.cost(answer.usage.prompt_tokens, answer.usage.completion_tokens)
            self.budget.settle(holds[i], cost or 0.0)
            results[i] = answer
        return results

    async def capabilities(self) -> Capabilities:
        """The inner teacher's capabilities (never cached: it is a live probe)."""
        return await self.inner.capabilities()

    async def aclose(self) -> None:
        """Close the inner teacher; the cache stays open for its owner to close."""
        await self.inner.aclose()

"""A teacher behind any OpenAI-compatible chat API (OpenAI, vLLM's server, llama.cpp, ...).

Servers differ: some ignore `n`, some refuse `json_schema` response formats. This
backend asks for what it needs, notices what the server did, and falls back
(extra requests with their own seeds; json_object; prompting), remembering what
worked and noting it in `self.notes`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import openai
from openai import AsyncOpenAI

from synth.errors import ConfigError
from synth.redact import redact, unmask
from synth.teachers.base import (
    Capabilities,
    ChatRequest,
    ChatResponse,
    Completion,
    PermanentTeacherError,
    SamplingParams,
    Teacher,
    TeacherError,
    TokenLogprob,
    TopLogprob,
    TransientTeacherError,
    Usage,
)
from synth.teachers.config import TeacherSettings
from synth.teachers.retry import RetryPolicy, call_with_retries, error_for_status

DEFAULT_BASE_URL = "https://api.openai.com/v1"
JSON_MODES = ("json_schema", "json_object", "prompt")
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "grammar", "guided")


class _FormatRefused(PermanentTeacherError):
    """The server rejected the response_format itself: try the next JSON mode, never retry."""


def normalize_base_url(url: str) -> str:
    """The base URL without credentials, query or fragment, lower-case host, no trailing slash."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def client_url(url: str) -> tuple[str, dict[str, str]]:
    """The base URL to give the official client, and the query parameters it must send on every request.

    The client joins `chat/completions` to its base URL's raw path, query included
    (`/v1/?api_key=Kchat/completions`, a 404): a query written in the URL (`?api_key=`, an
    Azure `api-version`) goes to the client's default query instead. Credentials in the
    userinfo stay in the URL: the HTTP client sends them as basic auth.
    """
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), dict(parse_qsl(parts.query, keep_blank_values=True))


def real_url(url: str) -> str:
    """`url` with any credentials this process masked (a recipe's saved teacher) put back; a mask it cannot undo is an error."""
    real = unmask(url)
    if real is None:
        raise ConfigError(
            f"teacher base_url {url}: its credentials were masked when it was saved and are not known here; "
            "give the teacher with its real URL (or put the key in the variable api_key_env names)"
        )
    return real


def map_error(exc: BaseException) -> TeacherError:
    """Turn whatever the client raised into a transient or permanent `TeacherError`."""
    if isinstance(exc, TeacherError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return TransientTeacherError("request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f": {type(cause).__name__}" if cause is not None else ""
        return TransientTeacherError(f"connection failed{detail}")
    if isinstance(exc, openai.APIResponseValidationError):
        return TransientTeacherError("malformed response body", status=exc.status_code)
    if isinstance(exc, openai.APIStatusError):
        return error_for_status(exc.status_code, _server_message(exc), exc.response.headers)
    if isinstance(exc, ValueError):
        # The client calls response.json() on a JSON content type: a truncated or
        # garbled body surfaces as JSONDecodeError, typically a proxy hiccup.
        return TransientTeacherError(f"invalid JSON in response: {type(exc).__name__}")
    if isinstance(exc, openai.OpenAIError):
        return PermanentTeacherError(redact(f"{type(exc).__name__}: {exc}"))
    raise exc


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error")
        text = msg if isinstance(msg, str) else str(body)
    elif isinstance(body, str) and body.strip():
        text = body
    else:
        text = exc.response.reason_phrase or "error"
    # A server may echo the request URL, query string and all.
    return redact(" ".join(text.split())[:500])


def _is_format_refusal(exc: openai.APIStatusError) -> bool:
    """Whether an error answering a request that carried a response_format is about that format.

    400/415/422 count even without saying so: if the request was bad for another
    reason, the plain-prompt fallback fails too and no mode is remembered. A 5xx
    counts only if it names the format (llama.cpp answers a 500 naming it).
    """
    if exc.status_code in (400, 415, 422):
        return True
    text = _server_message(exc).lower()
    return exc.status_code not in (408, 429) and any(w in text for w in _FORMAT_WORDS)


def _schema_instruction(schema: dict[str, Any]) -> str:
    return "Answer with a single JSON object, and nothing else, matching this JSON schema:\n" + json.dumps(schema)


class OpenAITeacher(Teacher):
    """A teacher reached over HTTP with the official `openai` client; retries are ours."""

    backend = "openai"
    batch_size = 1

    def __init__(self, config: TeacherSettings):
        super().__init__(config.model)
        self.config = config
        self.concurrency = config.concurrency or 64
        self._url, self._query = client_url(real_url(config.base_url or DEFAULT_BASE_URL))
        self.base_url = normalize_base_url(self._url)
        self.policy = RetryPolicy(config.max_retries, config.backoff_base, config.backoff_max)
        self.json_mode: str | None = None if config.structured_output == "auto" else config.structured_output
        self.n_supported: bool | None = None
        self.notes: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncOpenAI | None = None

    def __repr__(self) -> str:
        return f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r})"

    def cache_identity(self) -> dict[str, Any]:
        """Backend, model and the credential-free base URL: another server may answer differently."""
        return {"backend": self.backend, "model": self.model, "base_url": self.base_url}

    @property
    def spec(self) -> str:
        """`openai:MODEL@BASE_URL`, with no credentials (nor a key some gateways put in the path)."""
        return redact(f"openai:{self.model}@{self.base_url}")

    def _ensure_client(self) -> AsyncOpenAI:
        # The client's connection pool and our semaphore belong to one event loop;
        # a caller that runs us under a new loop gets fresh ones.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            key = os.environ.get(self.config.api_key_env) or "EMPTY"
            self._client = AsyncOpenAI(
                api_key=key, base_url=self._url, default_query=self._query or None, max_retries=0, timeout=self.config.timeout
            )
            self._loop = loop
            self._sem = asyncio.Semaphore(self.concurrency)
            self._probe_lock = asyncio.Lock()
        return self._client

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    async def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse | TeacherError]:
        """Complete each request concurrently; failures come back in the list, not raised."""
        self._ensure_client()
        if len(requests) == 1:  # the runner's usual batch: no task to spawn
            return [await self._one(requests[0])]
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: ChatRequest) -> ChatResponse | TeacherError:
        self.stats.requests_sent += 1
        try:
            resp = await self._complete(req)
        except TeacherError as err:
            self.stats.errors += 1
            return err
        self.stats.requests_ok += 1
        return resp

    async def _complete(self, req: ChatRequest) -> ChatResponse:
        p, want, off = req.params, req.params.n, req.sample_offset
        if want > 1 and self.n_supported is False:
            replies = await _gather_or_raise(self._request(req, 1, req.sample_seed(off + i)) for i in range(want))
        else:
            first = await self._request(req, want, req.sample_seed(off))
            replies, got = [first], len(first.completions)
            if want > 1 and self.n_supported is None:
                self.n_supported = got >= want
                if not self.n_supported:
                    self._note(f"server returned {got} of n={want} choices; asking once per missing sample with its own seed")
            if got < want:
                replies += await _gather_or_raise(self._request(req, 1, req.sample_seed(off + i)) for i in range(got, want))
        completions = [c for r in replies for c in r.completions][:want]
        usage = Usage(
            prompt_tokens=sum(r.usage.prompt_tokens for r in replies), completion_tokens=sum(r.usage.completion_tokens for r in replies)
        )
        return ChatResponse(completions=completions, usage=usage, model=replies[0].model, cached=[False] * want)

    async def _request(self, req: ChatRequest, n: int, seed: int | None) -> ChatResponse:
        """One logical request (retried), choosing the JSON mode when a schema is asked for."""
        if req.params.json_schema is not None and self.json_mode is None:
            async with self._probe_lock:
                # Only one request discovers the mode; the rest wait and reuse it.
                if self.json_mode is None:
                    reply, mode = await self._probe_modes(req, n, seed)
                    self.json_mode = mode
                    return reply
        mode = self.json_mode if req.params.json_schema is not None else None
        return await self._retrying(req, n, seed, mode)

    async def _probe_modes(self, req: ChatRequest, n: int, seed: int | None) -> tuple[ChatResponse, str]:
        for i, mode in enumerate(JSON_MODES):
            try:
                reply = await self._retrying(req, n, seed, mode)
            except _FormatRefused as err:
                self._note(f"{mode} refused ({err.reason[:160]}); falling back to {JSON_MODES[i + 1]}")
                continue
            if mode != JSON_MODES[0]:
                self._note(f"structured output: using {mode}")
            return reply, mode
        raise AssertionError("prompt mode sends no response_format, so it cannot be refused")

    async def _retrying(self, req: ChatRequest, n: int, seed: int | None, mode: str | None) -> ChatResponse:
        return await call_with_retries(lambda: self._post(req, n, seed, mode), self.policy, self.stats)

    async def _post(self, req: ChatRequest, n: int, seed: int | None, mode: str | None) -> ChatResponse:
        """Send one HTTP request and convert the answer; every failure becomes a TeacherError."""
        kwargs = self._build(req.messages, req.params, n, seed, mode)
        client = self._ensure_client()
        async with self._sem:
            try:
                # The body is plain JSON already: passed as extra_body it skips the client's typed
                # transform, and the raw response skips its model construction. Together they
                # cost more CPU per request than the rest of our layer (measured in
                # benchmarks/teacher_throughput.py); the bytes on the wire are the same.
                model = kwargs.pop("model")
                raw = await client.chat.completions.with_raw_response.create(model=model, messages=[], extra_body=kwargs)
                resp = json.loads(raw.content)
            except openai.APIStatusError as exc:
                if mode in ("json_schema", "json_object") and _is_format_refusal(exc):
                    raise _FormatRefused(_server_message(exc), status=exc.status_code) from None
                raise map_error(exc) from None
            except (openai.OpenAIError, ValueError) as exc:
                raise map_error(exc) from None
        reply = self._convert(resp, req.params)
        self.stats.prompt_tokens += reply.usage.prompt_tokens
        self.stats.completion_tokens += reply.usage.completion_tokens
        return reply

    def _build(self, messages: Sequence[Any], p: SamplingParams, n: int, seed: int | None, mode: str | None) -> dict:
        msgs = [m.model_dump() for m in messages]
        kwargs: dict[str, Any] = dict(model=self.model, messages=msgs, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens)
        if n > 1:
            kwargs["n"] = n
        if seed is not None:
            kwargs["seed"] = seed
        if p.stop:
            kwargs["stop"] = p.stop
        if p.logprobs is not None:
            kwargs.update(logprobs=True, top_logprobs=p.logprobs)
        schema = p.json_schema
        if schema is not None and mode is not None:
            if mode == "json_schema":
                name = str(schema.get("title") or "response").replace(" ", "_")[:64]
                spec = {"name": name, "schema": schema, "strict": True}
                kwargs["response_format"] = {"type": "json_schema", "json_schema": spec}
            else:
                # Both json_object and prompt carry the schema in the system message:
                # OpenAI requires the word JSON there, and servers that drop the
                # `schema` key still see it.
                if mode == "json_object":
                    kwargs["response_format"] = {"type": "json_object", "schema": schema}
                if msgs and msgs[0]["role"] == "system":
                    msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + _schema_instruction(schema)}
                else:
                    msgs.insert(0, {"role": "system", "content": _schema_instruction(schema)})
        return kwargs

    def _convert(self, resp: Any, p: SamplingParams) -> ChatResponse:
        """A chat.completion JSON body as our types; anything malformed is a transient error."""
        if not isinstance(resp, dict):
            raise TransientTeacherError("malformed response: not a chat completion")
        try:
            choices = resp.get("choices") or []
            if not choices:
                raise TransientTeacherError("response has no choices")
            u = resp.get("usage") or {}
            usage = Usage(prompt_tokens=u.get("prompt_tokens") or 0, completion_tokens=u.get("completion_tokens") or 0)
            out = []
            for ch in sorted(choices, key=lambda c: c.get("index") or 0):
                lps = self._logprobs(ch, p.logprobs)
                # Usage is per request; with several choices and no logprobs to
                # count, split it evenly rather than invent precision.
                ntok = len(lps) if lps is not None else (usage.completion_tokens // len(choices))
                text = ch["message"].get("content") or ""
                out.append(Completion(text=text, finish_reason=ch.get("finish_reason"), completion_tokens=ntok, logprobs=lps))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TransientTeacherError(f"malformed response: {type(exc).__name__}") from None
        return ChatResponse(completions=out, usage=usage, model=resp.get("model") or self.model)

    @staticmethod
    def _logprobs(choice: dict, k: int | None) -> list[TokenLogprob] | None:
        content = (choice.get("logprobs") or {}).get("content")
        if k is None or content is None:
            return None
        out = []
        for t in content:
            # llama.cpp appends the sampled token to top_logprobs when it is not
            # among the top k: keep the k best.
            top = sorted(t.get("top_logprobs") or [], key=lambda c: -c["logprob"])[:k]
            top_k = [TopLogprob(token=c["token"], logprob=c["logprob"]) for c in top]
            out.append(TokenLogprob(token=t["token"], logprob=t["logprob"], top=top_k))
        return out

    async def capabilities(self) -> Capabilities:
        """Probe the endpoint: latency of a short request, whether n=2 and logprobs work, which JSON mode works."""
        self._ensure_client()

        def ask(**kw: Any) -> ChatRequest:
            return ChatRequest(messages=[{"role": "user", "content": "Say OK."}], params=SamplingParams(temperature=0.0, **kw))

        t0 = time.perf_counter()
        await self._retrying(ask(max_tokens=2), 1, None, None)
        latency = time.perf_counter() - t0
        n_ok = await self._probe_ok(ask(max_tokens=2), 2, lambda r: len(r.completions) >= 2, "n=2")
        lp_ok = await self._probe_ok(ask(max_tokens=2, logprobs=2), 1, lambda r: bool(r.completions[0].logprobs), "logprobs")
        js_req = ask(max_tokens=8, json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
        # Probe from scratch even when a mode is configured or already learned.
        saved, self.json_mode = self.json_mode, None
        try:
            _, mode = await self._probe_modes(js_req, 1, None)
        finally:
            self.json_mode = saved
        if self.config.structured_output == "auto":
            self.json_mode = mode
        self.n_supported = n_ok
        return Capabilities(n=n_ok, logprobs=lp_ok, json_schema=mode, latency_s=round(latency, 4), notes=list(self.notes))

    async def _probe_ok(self, req: ChatRequest, n: int, check: Any, what: str) -> bool:
        try:
            ok = bool(check(await self._retrying(req, n, None, None)))
        except PermanentTeacherError as err:
            self._note(f"{what} refused: {err.reason[:160]}")
            return False
        if not ok:
            self._note(f"{what} not honoured by the server")
        return ok

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            try:
                await self._client.close()
            except RuntimeError:
                pass  # created under an event loop that is gone
            self._client = None


async def _gather_or_raise(coros: Any) -> list[ChatResponse]:
    """Run all; if any failed, raise the first failure (after the others finish, so none is orphaned)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)

"""A teacher behind any OpenAI-compatible chat API (OpenAI, vLLM's server, llama.cpp, ...).

Servers differ: some ignore `n`, some refuse `json_schema` response formats. This
backend asks for what it needs, notices what the server did, and falls back
(extra requests with their own seeds; json_object; prompting), remembering what
worked and noting it in `self.notes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
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
from synth.teachers.endpoints import Endpoint, EndpointPool
from synth.teachers.reasoning import split_generated, spelled_by
from synth.teachers.retry import RetryPolicy, call_with_retries, error_for_status

DEFAULT_BASE_URL = "https://api.openai.com/v1"
JSON_MODES = ("json_schema", "json_object", "prompt")
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "grammar", "guided")
#: What a reasoning model refuses, and what we send instead: OpenAI answers a 400 whose `param` names it.
_REASONING_PARAMS = ("max_tokens", "temperature", "top_p")
_CONTEXT_WORDS = ("context_length_exceeded", "maximum context length", "context length", "context window", "too many tokens")


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


def _error_fields(exc: openai.APIStatusError) -> tuple[str, str]:
    """The `param` and `code` of an OpenAI-style error body ('' where absent)."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("param") or ""), str(body.get("code") or "")


def _is_format_refusal(exc: openai.APIStatusError) -> bool:
    """Whether an error answering a request that carried a response_format is about that format.

    Only an error that names it counts (its `param`, or its message: llama.cpp answers a 500
    naming it): a context-length 400 or any other bad request is not a reason to fall back, and
    would otherwise cost a request per mode and leave a worse mode learned.
    """
    if exc.status_code in (408, 429) or _is_context_overflow(exc):
        return False
    param, _ = _error_fields(exc)
    text = (param + " " + _server_message(exc)).lower()
    return any(w in text for w in _FORMAT_WORDS)


def _is_context_overflow(exc: openai.APIStatusError) -> bool:
    """A 400 saying the prompt (plus max_tokens) does not fit the model's context: the same request always fails."""
    _, code = _error_fields(exc)
    text = (code + " " + _server_message(exc)).lower()
    return exc.status_code in (400, 413, 422) and any(w in text for w in _CONTEXT_WORDS)


def _refused_parameter(exc: openai.APIStatusError) -> str | None:
    """The sampling parameter a reasoning model refused (OpenAI's 400 `unsupported_parameter`/`unsupported_value`), if that is the error."""
    if exc.status_code != 400:
        return None
    param, code = _error_fields(exc)
    if param in _REASONING_PARAMS and code in ("unsupported_parameter", "unsupported_value"):
        return param
    text = _server_message(exc)
    # Proxies that keep only the message: "Unsupported parameter: 'max_tokens' is not supported with this model."
    for name in _REASONING_PARAMS:
        if f"'{name}'" in text and "nsupported" in text:
            return name
    return None


def _schema_key(schema: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]


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
        endpoints = []
        for url in config.base_urls or [config.base_url or DEFAULT_BASE_URL]:
            plain, query = client_url(real_url(url))
            endpoints.append(Endpoint(plain, query, normalize_base_url(plain)))
        self.pool = EndpointPool(endpoints, say=self._note)
        #: The endpoint's URL (several: the first, with the others in `spec`), credential-free.
        self.base_url = endpoints[0].name
        self.policy = RetryPolicy(config.max_retries, config.backoff_base, config.backoff_max)
        self.json_mode: str | None = None if config.structured_output == "auto" else config.structured_output
        #: The JSON mode learned for each schema (auto): a server may refuse one schema in strict mode and not another.
        self.json_modes: dict[str, str] = {}
        #: Sampling parameters this model refuses, sent otherwise or left out (see _build).
        self.refused: set[str] = set(_REASONING_PARAMS) if config.reasoning_model else set()
        self.n_supported: bool | None = None
        #: Whether any request was answered yet (until then requests go one at a time, see _post).
        self._answered = False
        self.notes: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def tokenizer_name(self) -> str | None:
        """The tokenizer the teacher file names (`tokenizer:`), if any: an HTTP API does not say."""
        return self.config.tokenizer

    def cache_identity(self) -> dict[str, Any]:
        """Backend, model and the credential-free base URL: another server may answer differently."""
        names = sorted(e.name for e in self.pool.endpoints)
        # Replicas of one model answer alike: the set of endpoints is the identity, not the one a request went to.
        identity = {"backend": self.backend, "model": self.model, "base_url": names[0] if len(names) == 1 else names}
        if self.config.reasoning_effort is not None:
            identity["reasoning_effort"] = self.config.reasoning_effort  # more thinking, other answers
        return identity

    @property
    def spec(self) -> str:
        """`openai:MODEL@BASE_URL`, with no credentials (nor a key some gateways put in the path)."""
        return redact(f"openai:{self.model}@{','.join(e.name for e in self.pool.endpoints)}")

    def _ensure_client(self) -> None:
        # The clients' connection pools and our semaphore belong to one event loop;
        # a caller that runs us under a new loop gets fresh ones.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            key = os.environ.get(self.config.api_key_env) or "EMPTY"
            for e in self.pool.endpoints:
                e.client = AsyncOpenAI(
                    api_key=key, base_url=e.url, default_query=e.query or None, max_retries=0, timeout=self.config.timeout
                )
            self._loop = loop
            self._sem = asyncio.Semaphore(self.concurrency)
            self._probe_lock = asyncio.Lock()
            self._first_lock = asyncio.Lock()

    def _note(self, text: str, say: bool = True) -> None:
        """Remember what the server made us do; said once on stderr, since it changes what a job sends."""
        if text not in self.notes:
            self.notes.append(text)
            if say:
                print(f"teacher {self.spec}: {text}", file=sys.stderr, flush=True)

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
            prompt_tokens=sum(r.usage.prompt_tokens for r in replies),
            completion_tokens=sum(r.usage.completion_tokens for r in replies),
            reasoning_tokens=sum(r.usage.reasoning_tokens for r in replies),
        )
        return ChatResponse(completions=completions, usage=usage, model=replies[0].model, cached=[False] * want)

    async def _request(self, req: ChatRequest, n: int, seed: int | None) -> ChatResponse:
        """One logical request (retried), choosing the JSON mode when a schema is asked for."""
        schema = req.params.json_schema
        if schema is None:
            return await self._retrying(req, n, seed, None)
        if self.json_mode is not None:
            return await self._retrying(req, n, seed, self.json_mode)
        key = _schema_key(schema)
        if key not in self.json_modes:
            async with self._probe_lock:
                # Only one request discovers a schema's mode; the rest wait and reuse it.
                if key not in self.json_modes:
                    reply, mode = await self._probe_modes(req, n, seed)
                    self.json_modes[key] = mode
                    return reply
        return await self._retrying(req, n, seed, self.json_modes[key])

    def json_mode_for(self, schema: dict[str, Any]) -> str | None:
        """How a schema is asked for: the configured mode, else the one learned for it (None: not yet known)."""
        return self.json_mode or self.json_modes.get(_schema_key(schema))

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
        """Send one HTTP request and convert the answer; every failure becomes a TeacherError.

        A 400 naming a sampling parameter the model refuses (a reasoning model's max_tokens,
        temperature, top_p) is learned and the request sent again without it, at most once per
        parameter: the job goes on instead of ending in a file of permanent errors.
        """
        if self._answered:
            return await self._post_learning(req, n, seed, mode)
        # Until one request is answered, one at a time: a reasoning model's 400s teach the first
        # request what to leave out, not every request of the first wave.
        async with self._first_lock:
            if not self._answered:
                reply = await self._post_learning(req, n, seed, mode)
                self._answered = True
                return reply
        return await self._post_learning(req, n, seed, mode)

    async def _post_learning(self, req: ChatRequest, n: int, seed: int | None, mode: str | None) -> ChatResponse:
        while True:
            refused_before = set(self.refused)
            try:
                return await self._post_once(req, n, seed, mode)
            except openai.APIStatusError as exc:
                param = _refused_parameter(exc)
                if param is None or param in refused_before:
                    raise self._status_error(exc, mode) from None
                if param not in self.refused:
                    self.refused.add(param)
                    self._note(f"the model refuses {param!r} ({_server_message(exc)[:120]}); {_REFUSAL_FIX[param]}")

    async def _post_once(self, req: ChatRequest, n: int, seed: int | None, mode: str | None) -> ChatResponse:
        kwargs = self._build(req.messages, req.params, n, seed, mode)
        self._ensure_client()
        async with self._sem:
            endpoint = self.pool.pick()
            endpoint.in_flight += 1
            endpoint.sent += 1
            try:
                # The body is plain JSON already: passed as extra_body it skips the client's typed
                # transform, and the raw response skips its model construction. Together they
                # cost more CPU per request than the rest of our layer (measured in
                # benchmarks/teacher_throughput.py); the bytes on the wire are the same.
                model = kwargs.pop("model")
                raw = await endpoint.client.chat.completions.with_raw_response.create(model=model, messages=[], extra_body=kwargs)
                resp = json.loads(raw.content)
            except openai.APIStatusError as exc:
                if exc.status_code in (408, 429) or exc.status_code >= 500:
                    self.pool.failed(endpoint, f"HTTP {exc.status_code}")
                raise  # _post decides
            except (openai.OpenAIError, ValueError) as exc:
                error = map_error(exc)
                self.pool.failed(endpoint, error.reason)
                raise error from None
            finally:
                endpoint.in_flight -= 1
        self.pool.succeeded(endpoint)
        reply = self._convert(resp, req.params)
        self.stats.prompt_tokens += reply.usage.prompt_tokens
        self.stats.completion_tokens += reply.usage.completion_tokens
        self.stats.reasoning_tokens += reply.usage.reasoning_tokens
        return reply

    def _status_error(self, exc: openai.APIStatusError, mode: str | None) -> TeacherError:
        if mode in ("json_schema", "json_object") and _is_format_refusal(exc):
            return _FormatRefused(_server_message(exc), status=exc.status_code)
        if _is_context_overflow(exc):
            return PermanentTeacherError("prompt too long for the model's context: " + _server_message(exc), status=exc.status_code)
        return map_error(exc)

    def _build(self, messages: Sequence[Any], p: SamplingParams, n: int, seed: int | None, mode: str | None) -> dict:
        msgs = [m.model_dump() for m in messages]
        kwargs: dict[str, Any] = dict(model=self.model, messages=msgs)
        # A reasoning model takes max_completion_tokens (thinking included) and only its default sampling.
        kwargs["max_completion_tokens" if "max_tokens" in self.refused else "max_tokens"] = p.max_tokens
        if "temperature" not in self.refused:
            kwargs["temperature"] = p.temperature
        if "top_p" not in self.refused:
            kwargs["top_p"] = p.top_p
        if self.config.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.config.reasoning_effort
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
            details = u.get("completion_tokens_details") or {}
            usage = Usage(
                prompt_tokens=u.get("prompt_tokens") or 0,
                completion_tokens=u.get("completion_tokens") or 0,
                reasoning_tokens=details.get("reasoning_tokens") or 0,
            )
            out = [self._completion(ch, p, usage, len(choices)) for ch in sorted(choices, key=lambda c: c.get("index") or 0)]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TransientTeacherError(f"malformed response: {type(exc).__name__}") from None
        return ChatResponse(completions=out, usage=usage, model=resp.get("model") or self.model)

    def _completion(self, ch: dict, p: SamplingParams, usage: Usage, choices: int) -> Completion:
        """One choice: its answer, reasoning (a server's own field, or a `<think>` block in the text), refusal and logprobs."""
        message = ch["message"]
        text = message.get("content") or ""
        lps = self._logprobs(ch, p.logprobs)
        # DeepSeek, vLLM and llama.cpp name it reasoning_content; OpenRouter and others reasoning.
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        reasoning = reasoning if isinstance(reasoning, str) and reasoning.strip() else None
        if reasoning is None:  # a server without a reasoning parser: any thinking is in the text
            split = split_generated(text, len(lps or ()), spelled_by([t.token for t in lps]) if lps is not None else None)
            if split.reasoning is not None:
                reasoning, text = split.reasoning, split.answer
                lps = lps[split.reasoning_tokens :] if lps is not None and split.aligned else None
        # Usage is per request; with several choices and no logprobs to count (or logprobs
        # that skip the reasoning), split it evenly rather than invent precision.
        ntok = len(lps) if lps is not None and reasoning is None else usage.completion_tokens // choices
        refusal = message.get("refusal")
        return Completion(
            text=text,
            finish_reason=ch.get("finish_reason"),
            completion_tokens=ntok,
            logprobs=lps,
            reasoning=reasoning,
            reasoning_tokens=usage.reasoning_tokens // choices,
            refusal=refusal if isinstance(refusal, str) and refusal.strip() else None,
        )

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
        """Close the HTTP connection pools."""
        for e in self.pool.endpoints:
            if e.client is not None:
                try:
                    await e.client.close()
                except RuntimeError:
                    pass  # created under an event loop that is gone
                e.client = None
        self._loop = None


#: What the backend does about each parameter a reasoning model refuses, as said on stderr.
_REFUSAL_FIX = {
    "max_tokens": "sending max_completion_tokens instead (set reasoning_model: true in the teacher file to skip this)",
    "temperature": "leaving temperature out: samples use the model's default (set reasoning_model: true to skip this)",
    "top_p": "leaving top_p out: samples use the model's default (set reasoning_model: true to skip this)",
}


async def _gather_or_raise(coros: Any) -> list[ChatResponse]:
    """Run all; if any failed, raise the first failure (after the others finish, so none is orphaned)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)

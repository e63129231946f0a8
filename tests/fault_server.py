"""A small, real OpenAI-compatible HTTP server that misbehaves on request.

It speaks enough of `POST /v1/chat/completions` (and `GET /v1/models`) for the
official client, on a raw asyncio server in a background thread, so hundreds of
concurrent connections cost one coroutine each (the throughput benchmark reuses it).

Faults come from `script` (a list consumed one entry per request) or from a
directive in the last user message: `!fault=NAME` or `!fault=NAME*K` (the first K
requests carrying that exact message get the fault, later ones succeed). Names:
`429` (with Retry-After: `retry_after`), `408` (Request Timeout, an OpenAI-style error body), `500`, `503`, `400`, `stall` (no answer
for `stall_s`), `drop` (close the socket without a response), `badjson` (200 with
a broken JSON body), `truncated` (200 whose body stops mid-JSON, short of its
Content-Length, then the socket closes), `empty` (200 with no choices), `ok`; and the answers that are not answers, each in its
provider's documented shape: `refusal` (OpenAI: `content: null` beside a `refusal` message),
`content_filter` (`finish_reason: "content_filter"`, no content), `tool_calls` (`content: null`,
a `tool_calls` list, `finish_reason: "tool_calls"`), `context` (OpenAI's 400
`context_length_exceeded`).
With `fault_rate` > 0, requests that neither the script nor a directive decide get
a fault drawn at random from `fault_kinds` (seeded by `fault_seed`) that often.

Counters: requests received and good answers sent (and the tokens their `usage` billed), in all and per distinct sample
(the messages plus the seed tag of each choice), so a test can tell whether any
sample was answered twice (paid twice), and how often each logical request
(messages, seed, n) was tried (its retries).

A good answer echoes deterministically: `echo: <last user message> #<seed + i>`
for choice i (`#c<i>` without a seed; `answer_suffix` appended, inside the `echo` field of a JSON
answer), or the fixed text `replies` maps to the first of its substrings found in the last user
message (both may be changed between runs, to make a second run's answers differ), with word-count usage, `n` honoured unless
`honor_n=False`, and fake logprobs when asked for. `json_schema=False` refuses
that response format with a 500 (as llama.cpp does), `json_object=False` with a 400;
`strict_schemas=True` refuses, as OpenAI's strict mode does, a json_schema whose objects do not
set `additionalProperties: false` (a 400 naming `response_format`).

Reasoning teachers: `reasoning="reasoning_content"` answers like DeepSeek-R1 (and vLLM's and
llama.cpp's reasoning parsers), the thinking in `message.reasoning_content` and counted in
`usage.completion_tokens_details.reasoning_tokens`; `reasoning="reasoning"` like OpenRouter;
`reasoning="inline"` like a server without a parser, `<think>…</think>` in front of the content.
`reasoning_model=True` answers like OpenAI's o-series and gpt-5: a 400 `unsupported_parameter`
naming `max_tokens` (use `max_completion_tokens`), a 400 `unsupported_value` naming a
`temperature` other than 1, and `unsupported_parameter` naming `top_p`, each body exactly as
OpenAI sends it. With `upstream` (a real OpenAI-compatible server's /v1 URL, e.g. llama.cpp's),
a good answer's text is that server's answer to the same chat instead of the echo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

FAULTS = {"429", "408", "500", "503", "400", "stall", "drop", "badjson", "truncated", "empty", "ok",
          "refusal", "content_filter", "tool_calls", "context"}
#: What the reasoning of an answer says (a reasoning server's thinking, before the answer).
THINKING = "The user asks: {last}. Let me think it through step by step, then answer."
REFUSAL = "I'm sorry, but I can't help with that request."
#: Faults a real teacher shows now and then, all worth retrying: what `fault_rate` draws from.
TRANSIENT_FAULTS = ("429", "500", "503", "stall", "drop", "badjson", "truncated", "empty")
_DIRECTIVE = re.compile(r"!fault=(\w+)(?:\*(\d+))?")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class FaultServer:
    """Start with `start()` (or use as a context manager); `base_url` is the `/v1` URL."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        honor_n: bool = True,
        retry_after: float = 1.0,
        stall_s: float = 30.0,
        json_schema: bool = True,
        json_object: bool = True,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = TRANSIENT_FAULTS,
        fault_seed: int = 0,
        reasoning: str | None = None,
        reasoning_model: bool = False,
        strict_schemas: bool = False,
        upstream: str | None = None,
        answer_suffix: str = "",
        replies: dict[str, str] | None = None,
    ):
        #: Appended to every good echo answer's text (inside the `echo` field of a JSON answer).
        self.answer_suffix = answer_suffix
        #: Substring of the last user message -> the fixed text every choice of its good answer says.
        self.replies: dict[str, str] = dict(replies or {})
        self.reasoning = reasoning
        self.reasoning_model = reasoning_model
        self.strict_schemas = strict_schemas
        self.upstream = upstream
        self.latency = latency
        self.honor_n = honor_n
        self.retry_after = retry_after
        self.stall_s = stall_s
        self.json_schema = json_schema
        self.json_object = json_object
        self.script: list[str] = []
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self._rng = random.Random(fault_seed)
        self.port = 0
        self._lock = threading.Lock()
        self._received = 0
        self._completed = 0
        self._in_flight = 0
        #: The most chat requests being answered at once.
        self.max_in_flight = 0
        self._faults: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._bodies: list[dict[str, Any]] = []
        self._times: list[float] = []
        self._answered: dict[str, int] = {}
        self._answer_text: dict[str, str] = {}
        self._tries: dict[str, int] = {}
        self._usage_sent = [0, 0]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- counters (read from the test thread) ---------------------------------
    @property
    def received(self) -> int:
        """Chat requests fully read."""
        with self._lock:
            return self._received

    @property
    def completed(self) -> int:
        """Chat requests answered with a good 200 completion."""
        with self._lock:
            return self._completed

    def faults(self) -> dict[str, int]:
        """How many times each fault was served."""
        with self._lock:
            return dict(self._faults)

    def answered(self) -> dict[str, int]:
        """Good answers sent per distinct sample (messages + seed tag): a count above 1 was paid twice."""
        with self._lock:
            return dict(self._answered)

    def answer_texts(self) -> dict[str, str]:
        """The text of each distinct sample answered, by the same key as `answered()`."""
        with self._lock:
            return dict(self._answer_text)

    def repaid(self) -> int:
        """Good answers sent again for a sample already answered once."""
        with self._lock:
            return sum(c - 1 for c in self._answered.values())

    def tries(self) -> dict[str, int]:
        """Requests received per logical request (messages, seed, n, response format): 1 + its retries."""
        with self._lock:
            return dict(self._tries)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies received, in arrival order."""
        with self._lock:
            return list(self._bodies)

    @property
    def arrival_times(self) -> list[float]:
        """`time.monotonic()` at which each chat request was read."""
        with self._lock:
            return list(self._times)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Return once every connection is closed and handled: after a client is killed, what it had sent is counted.

        A dead client's requests are in the server's socket buffers the moment it dies (loopback); each
        connection's handler reads them, counts them and ends on the closed socket, so no handler left
        means nothing left to count. No fixed sleep: it waits on that condition, with a deadline.
        """
        deadline = time.monotonic() + timeout
        while self._tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._tasks)} connections still open after {timeout} s")
            time.sleep(0.005)

    def usage_sent(self) -> tuple[int, int]:
        """(prompt, completion) tokens in the `usage` of every 200 completion sent: what a client was billed."""
        with self._lock:
            return self._usage_sent[0], self._usage_sent[1]

    def reset(self) -> None:
        """Zero the counters and forget the per-message fault budgets."""
        with self._lock:
            self._received = self._completed = self.max_in_flight = 0
            self._faults.clear()
            self._seen.clear()
            self._bodies.clear()
            self._times.clear()
            self._answered.clear()
            self._answer_text.clear()
            self._tries.clear()
            self._usage_sent = [0, 0]
            self.script = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "FaultServer":
        """Listen on a free 127.0.0.1 port in a daemon thread."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=2048))
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self) -> None:
        """Close every connection and stop the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- HTTP ------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._dispatch(method, path.split("?")[0], body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # the client went away, or stop() cancelled a stalled answer
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "content-type: application/json", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _dispatch(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path == "/v1/models":
            await self._send(writer, 200, json.dumps({"object": "list", "data": [{"id": "fault-model", "object": "model"}]}).encode())
            return True
        if method != "POST" or path != "/v1/chat/completions":
            await self._send(writer, 404, _error("not found", "not_found"))
            return True
        try:
            req = json.loads(raw)
        except ValueError:
            await self._send(writer, 400, _error("body is not JSON", "invalid_request_error"))
            return True
        fault = self._record(req)
        try:
            return await self._respond(fault, req, writer)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _respond(self, fault: str, req: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault == "drop":
            writer.transport.abort()
            return False
        if fault == "stall":
            await asyncio.sleep(self.stall_s)
            return False
        if fault == "429":
            await self._send(writer, 429, _error("rate limited", "rate_limit_exceeded"), {"retry-after": f"{self.retry_after:g}"})
        elif fault == "408":
            await self._send(writer, 408, _error("Request timed out before the server finished reading it.", "timeout", code="request_timeout"))
        elif fault in ("500", "503"):
            await self._send(writer, int(fault), _error(f"injected {fault}", "server_error"))
        elif fault == "400":
            await self._send(writer, 400, _error("injected bad request: temperature is invalid", "invalid_request_error"))
        elif fault == "truncated":
            # A proxy or server dying mid-body: the head promises more than ever arrives.
            body = json.dumps(self._answer(req, None)).encode()
            head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            writer.write(head.encode("latin-1") + body[: len(body) // 2])
            await writer.drain()
            writer.transport.abort()
            return False
        elif fault == "context":
            # OpenAI's answer to a prompt that does not fit, word for word.
            message = ("This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. "
                       "Please reduce the length of the messages.")
            await self._send(writer, 400, _error(message, "invalid_request_error", param="messages", code="context_length_exceeded"))
        elif fault in ("refusal", "content_filter", "tool_calls"):
            body = _not_an_answer(fault, req)
            await self._send(writer, 200, json.dumps(body).encode())
            with self._lock:
                self._completed += 1
                self._bill(body["usage"])
        elif fault == "badjson":
            await self._send(writer, 200, b'{"id": "x", "choices": [{"index": 0, "mess')
        elif fault == "empty":
            await self._send(writer, 200, json.dumps({"id": "x", "object": "chat.completion", "model": "fault-model", "choices": []}).encode())
        else:
            rf = (req.get("response_format") or {}).get("type")
            if rf == "json_schema" and not self.json_schema:
                # What llama.cpp's server answers.
                await self._send(writer, 500, _error("response_format.type: Input should be 'text' or 'json_object'", "internal_server_error"))
                return True
            if rf == "json_object" and not self.json_object:
                await self._send(writer, 400, _error("response_format json_object is not supported", "invalid_request_error"))
                return True
            schema = ((req.get("response_format") or {}).get("json_schema") or {}).get("schema")
            if rf == "json_schema" and self.strict_schemas and not _strict(schema):
                name = req["response_format"]["json_schema"].get("name", "response")
                message = (f"Invalid schema for response_format '{name}': In context=(), 'additionalProperties' is required "
                           "to be supplied and to be false.")
                await self._send(writer, 400, _error(message, "invalid_request_error", param="response_format"))
                return True
            if self.reasoning_model:
                refused = _reasoning_model_refusal(req)
                if refused is not None:
                    await self._send(writer, 400, refused)
                    return True
            if self.upstream:
                req = {**req, "upstream": await asyncio.to_thread(self._ask_upstream, req)}
            answer = self._answer(req, rf)
            await self._send(writer, 200, json.dumps(answer).encode())
            with self._lock:
                self._completed += 1
                self._bill(answer["usage"])
                # Counted once the bytes are handed to the socket: from here on the sample is paid for.
                for i, choice in enumerate(answer["choices"]):
                    key = _sample_key(req, _tag(req, i))
                    self._answered[key] = self._answered.get(key, 0) + 1
                    self._answer_text[key] = choice["message"]["content"]
        return True

    def _bill(self, usage: dict[str, Any]) -> None:
        """Count a sent answer's usage (the caller holds the lock)."""
        self._usage_sent[0] += usage["prompt_tokens"]
        self._usage_sent[1] += usage["completion_tokens"]

    def _record(self, req: dict[str, Any]) -> str:
        last = _last_user(req)
        with self._lock:
            self._received += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._bodies.append(req)
            self._times.append(time.monotonic())
            attempt = _request_key(req)
            self._tries[attempt] = self._tries.get(attempt, 0) + 1
            fault = "ok"
            m = None if self.script else _DIRECTIVE.search(last)
            if self.script:
                fault = self.script.pop(0)
            elif m:
                seen = self._seen.get(last, 0)
                self._seen[last] = seen + 1
                if m.group(2) is None or seen < int(m.group(2)):
                    fault = m.group(1)
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.fault_kinds)
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}")
            if fault != "ok":
                self._faults[fault] = self._faults.get(fault, 0) + 1
            return fault

    def _answer(self, req: dict[str, Any], rf: str | None) -> dict[str, Any]:
        last = _last_user(req)
        n = int(req.get("n") or 1) if self.honor_n else 1
        max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 1 << 30)
        k = req.get("top_logprobs") if req.get("logprobs") else None
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", []))
        choices, total = [], 0
        fixed = next((text for part, text in self.replies.items() if part in last), None)
        for i in range(n):
            tag = _tag(req, i)
            text = f"echo: {last} #{tag}{self.answer_suffix}"
            if "upstream" in req:
                text = req["upstream"][i % len(req["upstream"])]
            elif fixed is not None:
                text = fixed
            elif rf in ("json_object", "json_schema"):
                text = json.dumps({"echo": last + self.answer_suffix, "tag": tag})
            words = text.split(" ")
            finish = "length" if len(words) > max_tokens else "stop"
            words = words[:max_tokens]
            text = " ".join(words)
            total += len(words)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.reasoning:
                thinking = THINKING.format(last=last)
                total += len(thinking.split())
                if self.reasoning == "inline":
                    message["content"] = f"<think>\n{thinking}\n</think>\n\n{text}"
                else:
                    message[self.reasoning] = thinking
            choice: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            if k is not None:
                toks = [w if j == 0 else " " + w for j, w in enumerate(words)]
                if self.reasoning == "inline":  # the thinking is in the text, so it has logprobs too
                    thought = THINKING.format(last=last).split(" ")
                    toks = ["<think>\n", *(w if j == 0 else " " + w for j, w in enumerate(thought)), "\n</think>\n\n", *toks]
                choice["logprobs"] = {"content": [_token_lp(t, j, int(k)) for j, t in enumerate(toks)]}
            choices.append(choice)
        return {
            "id": f"chatcmpl-{self.received}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model", "fault-model"),
            "choices": choices,
            "usage": self._usage(prompt_tokens, total, last, n),
        }

    def _usage(self, prompt_tokens: int, total: int, last: str, n: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total}
        if self.reasoning in ("reasoning_content", "reasoning"):
            usage["completion_tokens_details"] = {"reasoning_tokens": n * len(THINKING.format(last=last).split())}
        return usage

    def _ask_upstream(self, req: dict[str, Any]) -> list[str]:
        """The real server's answers to the chat (one per choice it returns): the text a good answer carries."""
        import urllib.request

        body = {"model": "upstream", "messages": req.get("messages"), "temperature": req.get("temperature", 0.0),
                "max_tokens": req.get("max_tokens") or req.get("max_completion_tokens") or 64, "seed": req.get("seed")}
        post = urllib.request.Request(self.upstream.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                      headers={"content-type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as resp:
            return [c["message"]["content"] or "" for c in json.loads(resp.read())["choices"]]


def _tag(req: dict[str, Any], i: int) -> str:
    """What tells choice `i` apart: its seed (`seed + i`), or `c<i>` without one."""
    seed = req.get("seed")
    return f"{seed + i}" if isinstance(seed, int) else f"c{i}"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _sample_key(req: dict[str, Any], tag: str) -> str:
    """One sample: the conversation, the response format and the choice's seed tag."""
    return f"{_digest([req.get('messages'), req.get('response_format')])}#{tag}"


def _request_key(req: dict[str, Any]) -> str:
    """One logical request, whatever its attempt: everything in the body that decides the answer."""
    return _digest([req.get("messages"), req.get("response_format"), req.get("seed"), req.get("n")])


def _last_user(req: dict[str, Any]) -> str:
    for m in reversed(req.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def _token_lp(token: str, j: int, k: int) -> dict[str, Any]:
    lp = -0.1 * (j + 1)
    top = [{"token": token, "logprob": lp, "bytes": None}]
    top += [{"token": f"{token}~{a}", "logprob": lp - a, "bytes": None} for a in range(1, k)]
    return {"token": token, "logprob": lp, "bytes": None, "top_logprobs": top[:k]}


def _error(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _reasoning_model_refusal(req: dict[str, Any]) -> bytes | None:
    """What OpenAI's o-series and gpt-5 answer a request carrying what they refuse (None: they take it)."""
    if "max_tokens" in req:
        message = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
        return _error(message, "invalid_request_error", param="max_tokens", code="unsupported_parameter")
    temperature = req.get("temperature")
    if temperature is not None and temperature != 1:
        message = f"Unsupported value: 'temperature' does not support {temperature:g} with this model. Only the default (1) value is supported."
        return _error(message, "invalid_request_error", param="temperature", code="unsupported_value")
    if "top_p" in req:
        return _error("Unsupported parameter: 'top_p' is not supported with this model.", "invalid_request_error", param="top_p", code="unsupported_parameter")
    return None


def _strict(schema: Any) -> bool:
    """Whether every object in a schema sets additionalProperties: false (OpenAI's strict mode requires it)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and schema.get("additionalProperties") is not False:
            return False
        return all(_strict(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_strict(v) for v in schema)
    return True


def _not_an_answer(kind: str, req: dict[str, Any]) -> dict[str, Any]:
    """A 200 whose choice is no answer, in the shape the provider documents for it."""
    if kind == "refusal":
        message = {"role": "assistant", "content": None, "refusal": REFUSAL}
        finish = "stop"
    elif kind == "content_filter":
        message, finish = {"role": "assistant", "content": None}, "content_filter"
    else:
        call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
        message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {
        "id": "chatcmpl-x", "object": "chat.completion", "created": int(time.time()), "model": req.get("model", "fault-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
    }


@contextmanager
def fault_server(**kwargs: Any) -> Iterator[FaultServer]:
    """A running `FaultServer` for the `with` block."""
    server = FaultServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()

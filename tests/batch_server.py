"""A small, real implementation of OpenAI's Files and Batch APIs, answering each line through a real chat server.

Enough of the API for the official client: `POST /v1/files` (multipart, purpose "batch"),
`GET /v1/files/{id}` and `/v1/files/{id}/content`; `POST /v1/batches`, `GET /v1/batches/{id}`,
`GET /v1/batches` (newest first, `limit`/`after` cursor pages, metadata), `POST /v1/batches/{id}/cancel`.

A batch walks validating → in_progress → finalizing → completed, one step per retrieve, so tests
poll fast and never sleep. In progress, a worker thread answers its lines one at a time by
forwarding each body to `upstream` (llama.cpp's server in the tests); the status moves on to
finalizing once they are all answered (and `hold` is off). Output and error files are written as
OpenAI writes them: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`,
failed requests in the error file, and, for a batch that expired or was cancelled, the lines never
run as `{"response": null, "error": {"code": "batch_expired" | "batch_cancelled", "message"}}`
(OpenAI leaves a cancelled batch's unrun lines out; this server writes them, which the client must
handle either way).

Faults, set between or during runs:
- `hold = True`: batches stay in_progress, answering their first `hold_after` lines only, until it is set back;
- `fail_lines[substring] = K`: the first K lines whose body contains `substring` are answered with a 500;
- `expire_next = K`: the next K batches created expire after answering `expire_after` lines;
- `fail_next = K`: the next K batches created fail validation (`errors.data`, no output).

`POST /v1/chat/completions` is served too (forwarded the same way, counted in `online_requests`):
the online API at the same base URL, so a teacher's batch and online requests share one cache identity.

Counters: `batches_created`, `lines_answered` (lines forwarded and answered by upstream), and
`answered[custom_id]`, `bodies[sha of body]` (how often each line was answered), so a test can
assert nothing was asked twice.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ENDPOINT = "/v1/chat/completions"


class BatchServer:
    """Start with `start()` (or `batch_server(...)`); `base_url` is the `/v1` URL."""

    def __init__(self, upstream: str | None = None):
        #: The real chat server's /v1 URL each line is forwarded to (None: an echo answer).
        self.upstream = upstream
        self.hold = False
        #: With `hold`, lines a batch answers before it pauses too.
        self.hold_after = 0
        self.fail_lines: dict[str, int] = {}
        self.expire_next = 0
        self.expire_after = 0
        self.fail_next = 0
        #: Echo answers (no upstream): whether `n` is honoured (llama.cpp ignores it), and seconds per line.
        self.honor_n = True
        self.line_delay = 0.0
        self.batches_created = 0
        #: Chat requests sent online to this same base URL (`POST /v1/chat/completions`, forwarded as batch lines are).
        self.online_requests = 0
        self.lines_answered = 0
        self.answered: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()
        self.retrieves = 0
        self.lists = 0
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._workers: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> BatchServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for worker in self._workers:
            worker.join(timeout=30)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> BatchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no worker is answering lines (a killed client's batch is still worked on)."""
        deadline = time.monotonic() + timeout
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    # -- files --------------------------------------------------------------------------------------

    def add_file(self, content: bytes, purpose: str, filename: str) -> dict[str, Any]:
        with self._lock:
            fid = self._new_id("file-")
            obj = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                   "filename": filename, "purpose": purpose, "status": "processed"}  # fmt: skip
            self.files[fid] = {"object": obj, "content": content}
            return obj

    # -- batches ------------------------------------------------------------------------------------

    def create_batch(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            file = self.files.get(body.get("input_file_id", ""))
            if file is None:
                return 404, _error(f"No such File object: {body.get('input_file_id')}", "invalid_request_error", "input_file_id")
            if body.get("endpoint") != ENDPOINT:
                return 400, _error("unsupported endpoint", "invalid_request_error", "endpoint")
            metadata = body.get("metadata") or {}
            if len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
                return 400, _error("metadata: at most 16 keys of 64 characters, values of 512", "invalid_request_error", "metadata")
            bid = self._new_id("batch_")
            now = int(time.time())
            batch = {
                "id": bid, "object": "batch", "endpoint": ENDPOINT, "errors": None, "input_file_id": file["object"]["id"],
                "completion_window": body.get("completion_window", "24h"), "status": "validating", "output_file_id": None,
                "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
                "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
            }  # fmt: skip
            fate = "ok"
            if self.fail_next > 0:
                self.fail_next -= 1
                fate = "fail"
            elif self.expire_next > 0:
                self.expire_next -= 1
                fate = "expire"
            lines, problems = _parse_lines(file["content"])
            self.batches[bid] = {"object": batch, "fate": fate, "lines": lines, "problems": problems, "results": {},
                                 "cancel": False, "worker": None}  # fmt: skip
            batch["request_counts"]["total"] = len(lines)
            self.batches_created += 1
            return 200, dict(batch)

    def retrieve_batch(self, bid: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.retrieves += 1
            entry = self.batches.get(bid)
            if entry is None:
                return 404, _error(f"No such Batch: {bid}", "invalid_request_error", None)
            self._advance(entry)
            return 200, self._view(entry)

    def cancel_batch(self, bid: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            entry = self.batches.get(bid)
            if entry is None:
                return 404, _error(f"No such Batch: {bid}", "invalid_request_error", None)
            batch = entry["object"]
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                return 409, _error(f"Cannot cancel a batch with status {batch['status']}", "invalid_request_error", None)
            if batch["status"] != "cancelling":
                entry["cancel"] = True
                batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
            return 200, self._view(entry)

    def list_batches(self, limit: int, after: str | None) -> dict[str, Any]:
        with self._lock:
            self.lists += 1
            ordered = list(reversed(self.batches))  # newest first, as OpenAI lists them
            if after in ordered:
                ordered = ordered[ordered.index(after) + 1 :]
            page = ordered[:limit]
            data = [self._view(self.batches[b]) for b in page]
            return {"object": "list", "data": data, "first_id": page[0] if page else None,
                    "last_id": page[-1] if page else None, "has_more": len(ordered) > len(page)}  # fmt: skip

    def _view(self, entry: dict[str, Any]) -> dict[str, Any]:
        batch = dict(entry["object"])
        results = entry["results"]
        ok = sum(1 for r in results.values() if r.get("response") and r["response"]["status_code"] == 200)
        batch["request_counts"] = {"total": len(entry["lines"]), "completed": ok, "failed": len(results) - ok}
        return batch

    def _advance(self, entry: dict[str, Any]) -> None:
        """One step of the batch's life per retrieve."""
        batch = entry["object"]
        now = int(time.time())
        status = batch["status"]
        if status == "validating":
            if entry["fate"] == "fail" or entry["problems"]:
                problems = entry["problems"] or [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached (test fault).", "line": None, "param": None}]
                batch.update(status="failed", failed_at=now, errors={"object": "list", "data": problems})
                return
            batch.update(status="in_progress", in_progress_at=now)
            worker = threading.Thread(target=self._work, args=(entry,), daemon=True)
            entry["worker"] = worker
            self._workers.append(worker)
            worker.start()
        elif status == "in_progress":
            worker = entry["worker"]
            if entry["fate"] == "expire" and not worker.is_alive():
                self._finish(entry, "expired", "batch_expired", "This request could not be executed before the completion window expired.")
            elif not worker.is_alive() and not self.hold:
                batch.update(status="finalizing", finalizing_at=now)
        elif status == "finalizing":
            self._finish(entry, "completed", None, "")
        elif status == "cancelling":
            if entry["worker"] is None or not entry["worker"].is_alive():
                self._finish(entry, "cancelled", "batch_cancelled", "This request was not executed: the batch was cancelled.")

    def _finish(self, entry: dict[str, Any], status: str, code: str | None, message: str) -> None:
        batch = entry["object"]
        out, err = [], []
        for line in entry["lines"]:
            result = entry["results"].get(line["custom_id"])
            if result is None:
                if code is None:
                    continue
                result = {"id": self._new_id("batch_req_"), "custom_id": line["custom_id"], "response": None,
                          "error": {"code": code, "message": message}}  # fmt: skip
            (out if result["response"] and result["response"]["status_code"] == 200 else err).append(result)
        if out:
            batch["output_file_id"] = self.add_file(_jsonl(out), "batch_output", f"{batch['id']}_output.jsonl")["id"]
        if err:
            batch["error_file_id"] = self.add_file(_jsonl(err), "batch_output", f"{batch['id']}_error.jsonl")["id"]
        batch["status"] = status
        batch[f"{status}_at"] = int(time.time())

    def _work(self, entry: dict[str, Any]) -> None:
        """Answer the batch's lines one at a time (llama.cpp serves one request at a time anyway)."""
        for count, line in enumerate(entry["lines"]):
            while self.hold and count >= self.hold_after and not entry["cancel"]:
                time.sleep(0.01)
            if entry["cancel"] or (entry["fate"] == "expire" and count >= self.expire_after):
                return
            body = line["body"]
            text = json.dumps(body, sort_keys=True)
            fault = None
            with self._lock:
                for marker, left in self.fail_lines.items():
                    if left > 0 and marker in text:
                        self.fail_lines[marker] = left - 1
                        fault = marker
                        break
            if self.line_delay:
                time.sleep(self.line_delay)
            if fault is not None:
                status, answer = 500, _error("The server had an error while processing your request (test fault).", "server_error", None)
            else:
                status, answer = self._forward(body)
            result = {"id": self._new_id("batch_req_"), "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": self._new_id("req_"), "body": answer}, "error": None}  # fmt: skip
            with self._lock:
                entry["results"][line["custom_id"]] = result
                if status == 200:
                    self.lines_answered += 1
                    self.answered[line["custom_id"]] += 1
                    self.bodies[hashlib.sha256(text.encode()).hexdigest()] += 1

    def _forward(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.upstream is None:
            last = body["messages"][-1]["content"]
            return 200, {"id": "chatcmpl-echo", "object": "chat.completion", "model": body.get("model", "echo"),
                         "choices": [{"index": i, "message": {"role": "assistant", "content": f"echo: {last} #{i}"}, "finish_reason": "stop"}
                                     for i in range(body.get("n", 1) if self.honor_n else 1)],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}  # fmt: skip
        request = urllib.request.Request(
            self.upstream.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read())
            except ValueError:
                return exc.code, _error(f"upstream error {exc.code}", "server_error", None)


class _Handler(BaseHTTPRequestHandler):
    owner: BatchServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        server = self.owner
        if m := re.fullmatch(r"/v1/files/([^/]+)/content", path):
            file = server.files.get(m[1])
            if file is None:
                return self._send(404, _error(f"No such File object: {m[1]}", "invalid_request_error", None))
            return self._send(200, file["content"], "application/octet-stream")
        if m := re.fullmatch(r"/v1/files/([^/]+)", path):
            file = server.files.get(m[1])
            return self._send(200, file["object"]) if file else self._send(404, _error("No such File object", "invalid_request_error", None))
        if path == "/v1/batches":
            limit = min(100, max(1, int(query.get("limit", ["20"])[0])))
            return self._send(200, server.list_batches(limit, query.get("after", [None])[0]))
        if m := re.fullmatch(r"/v1/batches/([^/]+)", path):
            return self._send(*server.retrieve_batch(m[1]))
        self._send(404, _error(f"no route {path}", "invalid_request_error", None))

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        server = self.owner
        body = self._body()
        if path == "/v1/files":
            fields = _multipart(self.headers.get("Content-Type", ""), body)
            if fields.get("purpose", (None, b""))[1] != b"batch":
                return self._send(400, _error("purpose must be 'batch' here", "invalid_request_error", "purpose"))
            if "file" not in fields:
                return self._send(400, _error("missing file", "invalid_request_error", "file"))
            filename, content = fields["file"]
            return self._send(200, server.add_file(content, "batch", filename or "upload.jsonl"))
        if path == "/v1/batches":
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                return self._send(400, _error("invalid JSON", "invalid_request_error", None))
            return self._send(*server.create_batch(payload))
        if path == "/v1/chat/completions":  # the online API beside the batch one, as OpenAI serves both
            with server._lock:
                server.online_requests += 1
            return self._send(*server._forward(json.loads(body)))
        if m := re.fullmatch(r"/v1/batches/([^/]+)/cancel", path):
            return self._send(*server.cancel_batch(m[1]))
        self._send(404, _error(f"no route {path}", "invalid_request_error", None))


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _parse_lines(content: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The request lines of an input file, and the validation errors OpenAI would report."""
    lines, problems, seen = [], [], set()
    for number, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            problems.append({"code": "invalid_json_line", "message": "not valid JSON", "line": number, "param": None})
            continue
        if line.get("method") != "POST" or line.get("url") != ENDPOINT or not isinstance(line.get("body"), dict):
            problems.append({"code": "invalid_request", "message": "method, url or body is wrong", "line": number, "param": None})
        elif line.get("custom_id") in seen:
            problems.append({"code": "duplicate_custom_id", "message": "custom_id must be unique", "line": number, "param": "custom_id"})
        else:
            seen.add(line["custom_id"])
            lines.append(line)
    return lines, problems


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _error(message: str, kind: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@contextmanager
def batch_server(upstream: str | None = None) -> Iterator[BatchServer]:
    """A started BatchServer for a `with` block."""
    server = BatchServer(upstream).start()
    try:
        yield server
    finally:
        server.stop()

"""One function that hides credentials in any text a run prints or writes.

Teachers are named by URLs, and users put secrets in URLs (`https://user:pass@host/v1`,
`?api_key=...`). Everything that names a teacher or echoes a command line goes through
`redact` before it reaches a terminal, a log, a cache row or an output file.

Some masked text must still work later in the same process: a recipe saves its teacher
to `.recipe/teacher.yaml` (masked) for its stages to read. `remember` masks a text and keeps
the real one in this process's memory only; `unmask` gives it back to the one place that
needs it (the HTTP client). A new process that reads the masked file cannot undo the mask
and says so, rather than sending `***` as a password.
"""

from __future__ import annotations

import re

MASK = "***"

# user:password@ (or a lone token@) right after a URL scheme.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"]+)@")
# Query or fragment parameters whose name says they hold a secret.
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&#;](?:[\w.-]*(?:key|token|secret|password|passwd|pwd|auth|sig|signature|credential)s?[\w.-]*))=(?P<value>[^&#\s'\"]*)",
    re.IGNORECASE,
)
# Bearer tokens and well-known API key shapes that end up in error messages. A key has an
# upper-case letter or a digit somewhere, which spares names such as `hf-mirror-internal`.
_BEARER = re.compile(r"(?P<name>\bBearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE)
_KEY_SHAPES = re.compile(r"\b(?:sk|pk|rk|hf|ghp|gho|xox[abp])[-_](?=[A-Za-z0-9_-]*[A-Z0-9])[A-Za-z0-9_-]{12,}\b")

#: Masked text -> the real text, for what this process masked with `remember` (never written anywhere).
_REAL: dict[str, str] = {}


def redact(text: str) -> str:
    """`text` with URL credentials, secret-named query parameters, bearer tokens and API-key-shaped strings masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _SECRET_PARAM.sub(lambda m: f"{m['name']}={MASK}", text)
    text = _BEARER.sub(lambda m: f"{m['name']}{MASK}", text)
    return _KEY_SHAPES.sub(MASK, text)


def redact_all(items):
    """`redact` applied to every string in a list (an argv), other items kept as they are."""
    return [redact(x) if isinstance(x, str) else x for x in items]


def remember(text: str) -> str:
    """`redact(text)`, keeping `text` in this process's memory so that `unmask` can give it back.

    Two texts that mask alike (the same host with other credentials): the later one wins.
    """
    masked = redact(text)
    if masked != text:
        _REAL[masked] = text
    return masked


def unmask(text: str) -> str | None:
    """The real text behind `text`: itself when it holds no mask, what `remember` kept, else None."""
    if MASK not in text:
        return text
    return _REAL.get(text)


def redact_data(value):
    """`redact` applied to every string inside nested dicts and lists (settings saved with each record)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    return value

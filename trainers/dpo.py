"""DPO: TRL's DPOTrainer on preference pairs, with β and its loss variants exposed."""

from __future__ import annotations

import json

from trl import DPOConfig, DPOTrainer

from synth.errors import ConfigError
from trainers.common import (
    PAIR_COLUMNS,
    load_model,
    load_records,
    load_tokenizer,
    peft_config,
    resolve_model,
    split,
    train_and_save,
    trl_args,
)
from trainers.lengths import check_truncation, example_lengths
from trainers.settings import DPOSettings, TrainResult, require_data

#: TRL's logged DPO statistics reported in the metrics, first and last logged value of each.
REPORTED = ("rewards/margins", "rewards/accuracies")


def build_trainer(config: DPOSettings):
    """The TRL DPOTrainer for a config, with its tokenizer."""
    path = resolve_model(config.model, config.trust_remote_code)
    tokenizer = load_tokenizer(path, config)
    records = load_records(require_data(config), PAIR_COLUMNS)
    # TRL's collator cuts prompt + answer to max_length: count them first.
    check_truncation(example_lengths(records, tokenizer, ("chosen", "rejected")), config, "pairs", "cut")
    train, evaluation = split(records, config)
    args = DPOConfig(
        **trl_args(config),
        max_length=config.max_length,
        beta=config.beta,
        loss_type=[config.loss_type],
        label_smoothing=config.label_smoothing,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
    )
    return DPOTrainer(
        model=load_model(path, config),
        ref_model=reference_model(config, path, tokenizer),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config(config),
    ), tokenizer


def reference_model(config: DPOSettings, student_path, tokenizer):
    """π_ref: the named model, else a frozen copy of the student; None where TRL needs none (LoRA, precomputed)."""
    if config.ref_model is not None:
        path = resolve_model(config.ref_model, config.trust_remote_code)
        if load_tokenizer(path, config).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"ref_model {config.ref_model!r}: its tokenizer differs from the student's; DPO compares their log-probs token by token")
        return load_model(path, config)
    if config.lora or config.precompute_ref_log_probs:
        return None
    # Loaded here rather than by TRL so the copy gets the student's dtype (TRL's own copy would be fp32).
    return load_model(student_path, config)


def logged_extremes(history: list[dict]) -> dict[str, float]:
    """First and last training-time value of each statistic in REPORTED, e.g. 'rewards/margins_last'."""
    found = {}
    for key in REPORTED:
        values = [row[key] for row in history if key in row]
        if values:
            found[f"{key}_first"], found[f"{key}_last"] = float(values[0]), float(values[-1])
    return found


def train(config: DPOSettings) -> TrainResult:
    """Optimise the student on the pairs; returns where the model went and its metrics (reward margin included)."""
    trainer, tokenizer = build_trainer(config)
    result = train_and_save(trainer, config, tokenizer)
    extra = logged_extremes(trainer.state.log_history)
    result.metrics.update(extra)
    path = result.output_dir / "metrics.json"
    saved = json.loads(path.read_text())
    saved["final"].update(extra)
    path.write_text(json.dumps(saved, indent=2))
    return result


"""SFT: TRL's SFTTrainer on prompt/completion records (completion-only loss) or multi-turn messages."""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from synth.errors import InputError
from trainers.common import load_model, load_records, load_tokenizer, peft_config, resolve_model, split, train_and_save, trl_args
from trainers.settings import SFTSettings, TrainResult, require_data


def build_trainer(config: SFTSettings, trainer_class=None, extra_args: dict | None = None):
    """The TRL SFTTrainer (or a subclass) for a config, with its tokenizer; KD reuses this."""
    path = resolve_model(config.model, config.trust_remote_code)
    tokenizer = load_tokenizer(path, config)
    dataset = load_records(require_data(config), set())
    columns = set(dataset.column_names)
    if not ({"messages"} <= columns or {"prompt", "completion"} <= columns):
        raise_wrong_shape(config, columns)
    train, evaluation = split(dataset, config)
    args = SFTConfig(
        **trl_args(config),
        max_length=config.max_length,
        packing=config.packing,
        completion_only_loss=config.completion_only_loss if "completion" in columns else None,
        **(extra_args or {}),
    )
    cls = trainer_class or SFTTrainer
    trainer = cls(
        model=load_model(path, config),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config(config),
    )
    return trainer, tokenizer


def raise_wrong_shape(config: SFTSettings, columns: set[str]) -> None:
    """SFT needs messages or prompt/completion records."""
    raise InputError(f"{config.data}: SFT needs 'messages' or 'prompt'/'completion' records, found columns {sorted(columns - {'id'})}")


def train(config: SFTSettings) -> TrainResult:
    """Fine-tune the student on the records; returns where the model went and its metrics."""
    trainer, tokenizer = build_trainer(config)
    return train_and_save(trainer, config, tokenizer)


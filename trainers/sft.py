"""SFT: TRL's SFTTrainer on prompt/completion records or multi-turn messages, learning the answers (assistant turns) only."""

from __future__ import annotations

import functools

import trl
from trl import SFTConfig

from synth.errors import InputError
from trainers.chat_masks import with_assistant_masks
from trainers.common import load_model, load_records, load_tokenizer, peft_config, resolve_model, split, train_and_save, trl_args
from trainers.lengths import check_truncation, example_lengths
from trainers.settings import SFTSettings, TrainResult, require_data


class SFTTrainer(trl.SFTTrainer):
    """TRL's SFTTrainer, learning only the assistant turns of `messages` rows when `assistant_only` (any chat template).

    The rows are tokenized here with their assistant masks (trainers/chat_masks.py); TRL then
    turns the masks into labels, truncates and packs them as it does its own.
    """

    def __init__(self, *args, assistant_only: bool = True, **kwargs):
        self.assistant_only = assistant_only  # read by _prepare_dataset, which TRL's __init__ calls
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self.assistant_only and "messages" in dataset.column_names:
            dataset = with_assistant_masks(dataset, self._tokenizer, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


def build_trainer(config: SFTSettings, trainer_class=None, extra_args: dict | None = None):
    """The SFTTrainer above (or KD's subclass of TRL's) for a config, with its tokenizer; KD reuses this.

    Stops before the model loads when max_length would cut more than max_truncated of the records.
    """
    path = resolve_model(config.model, config.trust_remote_code)
    tokenizer = load_tokenizer(path, config)
    dataset = load_records(require_data(config), set())
    columns = set(dataset.column_names)
    if not ({"messages"} <= columns or {"prompt", "completion"} <= columns):
        raise_wrong_shape(config, columns)
    check_truncation(example_lengths(dataset, tokenizer), config)  # packing (TRL's bfd) cuts long rows too
    train, evaluation = split(dataset, config)
    args = SFTConfig(
        **trl_args(config),
        max_length=config.max_length,
        packing=config.packing,
        completion_only_loss=config.completion_only_loss if "completion" in columns else None,
        **(extra_args or {}),
    )
    cls = trainer_class or functools.partial(SFTTrainer, assistant_only=config.assistant_only_loss)
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

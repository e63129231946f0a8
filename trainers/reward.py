"""Reward model: TRL's RewardTrainer (Bradley–Terry) on preference pairs, with held-out pairwise accuracy."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import torch
from transformers import AutoModelForSequenceClassification, set_seed
from trl import RewardConfig, RewardTrainer

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
from trainers.settings import RewardSettings, TrainResult, require_data


def build_trainer(config: RewardSettings):
    """The TRL RewardTrainer for a config, with its tokenizer; the reward head starts from the student's weights."""
    path = resolve_model(config.model, config.trust_remote_code)
    tokenizer = load_tokenizer(path, config)
    records = load_records(require_data(config), PAIR_COLUMNS)
    # TRL's RewardTrainer drops the pairs longer than max_length: count them first.
    check_truncation(example_lengths(records, tokenizer, ("chosen", "rejected")), config, "pairs", "dropped")
    train, evaluation = split(records, config)
    args = RewardConfig(**trl_args(config), max_length=config.max_length, center_rewards_coefficient=config.center_rewards_coefficient)
    set_seed(config.seed)  # the score head is initialised at random when the model loads
    model = load_model(path, config, one_score_classifier())
    # The classifier scores the last non-pad token, so it must know which token pads.
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config(config, "SEQ_CLS"),
    )
    return trainer, tokenizer


def one_score_classifier():
    """AutoModelForSequenceClassification with one output, the reward (also for an unmerged LoRA dir, whose base has two)."""
    return SimpleNamespace(from_pretrained=partial(AutoModelForSequenceClassification.from_pretrained, num_labels=1))


def pairwise_accuracy(model, pairs, pad_token_id: int, batch_size: int = 8) -> float:
    """Fraction of tokenised pairs (chosen_ids, rejected_ids) where the model scores chosen above rejected."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    wins = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            rows = pairs[start : start + batch_size]
            seqs = rows["chosen_ids"] + rows["rejected_ids"]
            ids = torch.full((len(seqs), max(map(len, seqs))), pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, seq in enumerate(seqs):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
            half = len(rows["chosen_ids"])
            wins += int((scores[:half] > scores[half:]).sum())
    model.train(was_training)
    return wins / len(pairs)


def train(config: RewardSettings) -> TrainResult:
    """Train the reward model; its directory loads with AutoModelForSequenceClassification and carries the tokenizer."""
    trainer, tokenizer = build_trainer(config)
    held_out = trainer.eval_dataset  # tokenised by TRL: chosen_ids / rejected_ids
    before = {}
    if held_out is not None and len(held_out):
        before["pairwise_accuracy_before"] = pairwise_accuracy(trainer.model, held_out, tokenizer.pad_token_id, config.batch_size)
    result = train_and_save(trainer, config, tokenizer, before)
    if before:
        # Measured on the saved directory, so the number describes what PPO/GRPO/RLOO will load.
        saved = load_model(config.output_dir, config, one_score_classifier()).to(trainer.args.device)
        after = {"pairwise_accuracy": pairwise_accuracy(saved, held_out, tokenizer.pad_token_id, config.batch_size)}
        _amend_metrics(result, after)
    return result


def _amend_metrics(result: TrainResult, extra: dict[str, float]) -> None:
    """Add metrics known only after saving to the result and to metrics.json."""
    result.metrics.update(extra)
    path = result.output_dir / "metrics.json"
    saved = json.loads(path.read_text())
    saved["final"].update(extra)
    path.write_text(json.dumps(saved, indent=2))


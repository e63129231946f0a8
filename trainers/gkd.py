"""GKD: on-policy distillation from a white-box teacher held locally (TRL's experimental GKDTrainer).

For users who can run the teacher: at each step, with probability lmbda the student
samples its own answers and the teacher scores them token by token; otherwise the
records' answers are used. The loss is TRL's generalised JSD(beta) over the full
vocabulary at `temperature`. (TRL's DistillationTrainer covers the fully on-policy
case, lmbda = 1, with vLLM generation; GKDTrainer also mixes in the records.)
The teacher and the student must share a tokenizer.
"""

from __future__ import annotations

from trl.experimental.gkd import GKDConfig, GKDTrainer

from synth.errors import ConfigError, InputError
from trainers.common import load_model, load_records, load_tokenizer, peft_config, resolve_model, split, train_and_save, trl_args
from trainers.kd_data import vocab_fingerprint
from trainers.lengths import check_truncation, example_lengths
from trainers.settings import GKDSettings, TrainResult, require_data


def as_messages(dataset):
    """prompt/completion rows as `messages` (GKD's collator reads chats)."""
    if "messages" in dataset.column_names:
        return dataset

    def join(example):
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return {"messages": prompt + completion}

    return dataset.map(join, remove_columns=["prompt", "completion"])


def build_trainer(config: GKDSettings):
    """(GKDTrainer, tokenizer) for a config, after checking teacher and student share a vocabulary."""
    path, teacher_path = (resolve_model(spec, config.trust_remote_code) for spec in (config.model, config.teacher_model))
    tokenizer, teacher_tokenizer = load_tokenizer(path, config), load_tokenizer(teacher_path, config)
    if vocab_fingerprint(tokenizer) != vocab_fingerprint(teacher_tokenizer):
        raise ConfigError(
            f"GKD compares full next-token distributions, so the student's tokenizer ({path}) must be the teacher's "
            f"({teacher_path}); their vocabularies differ"
        )
    dataset = load_records(require_data(config), set())
    columns = set(dataset.column_names)
    if not ({"messages"} <= columns or {"prompt", "completion"} <= columns):
        raise InputError(f"{config.data}: GKD needs 'messages' or 'prompt'/'completion' records, found columns {sorted(columns - {'id'})}")
    # TRL's ChatML collator keeps the last max_length tokens of a long chat.
    check_truncation(example_lengths(dataset, tokenizer), config, fate="cut from the start")
    train, evaluation = split(as_messages(dataset), config)
    args = GKDConfig(
        **trl_args(config), max_length=config.max_length, lmbda=config.lmbda, beta=config.beta,
        temperature=config.temperature, max_new_tokens=config.max_new_tokens,
    )  # fmt: skip
    trainer = GKDTrainer(
        model=load_model(path, config), teacher_model=load_model(teacher_path, config), args=args, train_dataset=train,
        eval_dataset=evaluation, processing_class=tokenizer, peft_config=peft_config(config),
    )  # fmt: skip
    return trainer, tokenizer


def train(config: GKDSettings) -> TrainResult:
    """Distill the student from the local teacher; returns where the model went and its metrics."""
    trainer, tokenizer = build_trainer(config)
    return train_and_save(trainer, config, tokenizer)


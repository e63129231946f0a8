"""PPO: TRL's PPOTrainer against a reward model, maximising r(x, y) - kl_coef * KL(policy || SFT student).

The policy and the frozen reference both start from `model` (the SFT student); the value
model starts from the reward model. Steps: each of `max_steps` PPO updates samples one
completion for each of batch_size x grad_accum (x GPUs) prompts, so TRL's `total_episodes`
is max_steps x that batch (or epochs x prompts when max_steps is -1).

TRL's PPOTrainer has no resume, so a rerun over checkpoints resumes here: each checkpoint also
holds the value model and the reward measured before training (`ppo_state.json`, written last),
and the rerun starts from the checkpoint's policy, value model, optimizer and learning-rate
schedule for the updates that remain. What it cannot restore is the position in the shuffled
prompts and the sampling RNG: the resumed updates see prompts in a fresh order.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from synth.errors import ConfigError
from trainers.common import last_checkpoint, load_model, load_tokenizer, peft_config, pick_device, trl_args
from trainers.rl_common import finish, load_reward_model, mean_sampled_reward, numbers, prompt_text, reward_model_dir, start
from trainers.settings import PPOSettings, TrainResult

with warnings.catch_warnings():  # we know PPO lives in trl.experimental (TRL 1.12 is pinned for it)
    warnings.filterwarnings("ignore", message=".*trl.experimental")
    from trl.experimental.ppo import PPOConfig, PPOTrainer

CURVES = ["objective/scores", "objective/rlhf_reward", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/entropy_avg"]


#: Written into each checkpoint after its value model: a checkpoint without it is not resumable.
STATE_FILE = "ppo_state.json"
VALUE_DIR = "value_model"


def build_trainer(config: PPOSettings, resume_from: Path | None = None):
    """(PPOTrainer, where it started, metrics so far) for a config.

    With `resume_from` (a checkpoint this module wrote) the policy, value model, optimizer and
    schedule continue from it, and only the updates that remain are run.
    """
    begin = start(config)
    path, tokenizer = begin.policy, begin.tokenizer
    tokenizer.padding_side = "left"  # PPO generates from the right end of a batch of prompts
    encoded = begin.train.map(lambda row: {"input_ids": tokenizer(prompt_text(row["prompt"], tokenizer), add_special_tokens=False)["input_ids"]})
    distinct_pad(tokenizer, encoded["input_ids"])
    check_shared_vocab(config, tokenizer)
    per_step = config.batch_size * config.grad_accum
    if per_step % config.num_mini_batches:
        raise ConfigError(f"num_mini_batches={config.num_mini_batches} must divide batch_size x grad_accum = {per_step}")

    device, _, _ = pick_device(config)
    policy = load_model(resume_from or path, config).to(device)  # on the device already for the before-training samples
    reward = load_reward_model(config).to(device)
    if resume_from:
        # The reward of the starting student, which the checkpoint's policy no longer is.
        before = json.loads((resume_from / STATE_FILE).read_text())["reward_before"]
        trainer_state = json.loads((resume_from / "trainer_state.json").read_text())
    else:
        before = mean_sampled_reward(policy, tokenizer, reward, tokenizer, begin.reward_prompts, config, config.response_length)
        trainer_state = {"global_step": 0, "log_history": []}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    updates = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * len(encoded) / (per_step * world))
    # A run killed after its last checkpoint resumes with nothing left to do: it saves the policy.
    done = min(trainer_state["global_step"], updates)
    base = trl_args(config)
    base.update(eval_strategy="no", max_steps=-1)  # PPO counts episodes, and samples its own evaluation below
    args = PPOConfig(
        **base,
        total_episodes=(updates - done) * per_step * world,
        num_sample_generations=0,
        response_length=config.response_length,
        temperature=config.temperature,
        kl_coef=config.kl_coef,
        kl_estimator=config.kl_estimator,
        num_ppo_epochs=config.num_ppo_epochs,
        num_mini_batches=config.num_mini_batches,
        cliprange=config.cliprange,
        vf_coef=config.vf_coef,
        missing_eos_penalty=config.missing_eos_penalty,
        stop_token="eos",
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None if config.lora else load_model(path, config),  # LoRA: the adapter-free policy is the reference
        reward_model=reward,
        value_model=load_reward_model(config, resume_from / VALUE_DIR if resume_from else None),
        train_dataset=encoded.select_columns(["input_ids"]),
        peft_config=peft_config(config),
    )
    trainer.add_callback(checkpoint_state(trainer, before, updates, done, trainer_state["log_history"]))
    if resume_from:
        restore_optimizer(trainer, resume_from, updates)
    return trainer, begin, {"reward_before": before, "prompts_skipped": float(begin.skipped)}


def checkpoint_state(trainer, reward_before: float, updates: int, done: int, history: list[dict]):
    """A callback making PPOTrainer's checkpoints resumable: the value model and our state go in beside the policy.

    On a resumed run it also carries the step count, the log history and the schedule's length
    over from the checkpoint, so logs, checkpoint names and the learning rate continue.
    """
    class CheckpointState(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # PPOTrainer.train() zeroes these just before this call; the resumed run continues the counts.
            state.global_step = done
            state.episode = done * args.batch_size
            state.max_steps = updates
            state.log_history = list(history)

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            value = trainer.accelerator.unwrap_model(trainer.model).value_model
            tmp = checkpoint / (VALUE_DIR + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            value.save_pretrained(str(tmp))
            shutil.rmtree(checkpoint / VALUE_DIR, ignore_errors=True)
            os.replace(tmp, checkpoint / VALUE_DIR)
            (checkpoint / (STATE_FILE + ".partial")).write_text(json.dumps({"reward_before": reward_before}))
            os.replace(checkpoint / (STATE_FILE + ".partial"), checkpoint / STATE_FILE)

    return CheckpointState()


def restore_optimizer(trainer, checkpoint: Path, updates: int) -> None:
    """The checkpoint's optimizer moments, and a schedule as long as the whole run at the checkpoint's step."""
    trainer.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    # TRL sized the schedule for the updates that remain; the saved one counts from the run's start.
    trainer.lr_scheduler = None
    trainer.create_scheduler(num_training_steps=updates, optimizer=getattr(trainer.optimizer, "optimizer", trainer.optimizer))
    trainer.lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True))
    trainer.callback_handler.lr_scheduler = trainer.lr_scheduler


def distinct_pad(tokenizer, prompt_ids: list[list[int]]) -> None:
    """Give PPO a pad token that is neither EOS nor in any prompt.

    PPOTrainer finds prompt padding and where each completion ends by comparing tokens with
    pad_token_id, so a pad equal to EOS (SmolLM2's `<|im_end|>`, which ChatML puts inside every
    prompt) would mask real prompt tokens and hide the end of each completion.
    """
    used = {i for ids in prompt_ids for i in ids}
    if tokenizer.pad_token_id not in used and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for token in [tokenizer.unk_token, *tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())]:
        if token in vocab and vocab[token] not in used and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return
    raise ConfigError(
        f"PPO needs a padding token that is not EOS and never occurs in a prompt; {tokenizer.pad_token!r} is one of those "
        "and the tokenizer has no other special token to use: add a pad token to the student's tokenizer"
    )


def check_shared_vocab(config: PPOSettings, tokenizer) -> None:
    """PPO feeds the policy's token ids to the reward model: refuse one with another vocabulary."""
    path = reward_model_dir(config)
    vocab_size = json.loads((path / "config.json").read_text()).get("vocab_size")
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ConfigError(f"reward_model {str(path)!r}: vocabulary of {vocab_size} tokens, smaller than the student's {len(tokenizer)}; PPO needs the student's tokenizer")
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        if load_tokenizer(path, config).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"reward_model {str(path)!r}: its tokenizer differs from the student's; PPO needs a reward model on the student's tokenizer (GRPO and RLOO do not)")


def starting_checkpoint(config: PPOSettings) -> Path | None:
    """The newest checkpoint to resume from (one with our state file), or None to start afresh."""
    found = last_checkpoint(config.output_dir, written_last=STATE_FILE) if config.resume else None
    if found and config.lora:
        raise ConfigError(f"{found}: PPO with LoRA cannot resume a checkpoint; pass --no-resume to start over")
    return Path(found) if found else None


@contextmanager
def frozen_heap():
    """Keep what exists now out of the garbage collector's sweeps while inside.

    PPOTrainer calls gc.collect() twice per step; each walks every object the imports of
    torch/transformers/TRL made (0.7 s a call on a CPU here), which freezing skips.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train(config: PPOSettings) -> TrainResult:
    """Run PPO from the student against the reward model; returns the saved policy and its metrics."""
    trainer, begin, metrics = build_trainer(config, starting_checkpoint(config))
    with frozen_heap():
        trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model).policy  # the value head stays behind
    history = trainer.state.log_history
    metrics.update({k: v for k, v in numbers(history[-1]).items() if k in CURVES} if history else {})
    sampler = trainer.processing_class
    return finish(policy, sampler, trainer.reward_model, sampler, begin, config, config.response_length, history, metrics, CURVES)

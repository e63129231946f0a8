"""GRPO: TRL's GRPOTrainer with the reward model as its reward function, maximising r(x, y) - beta * KL(policy || SFT student).

Each prompt gets `num_generations` sampled completions; each completion's advantage is its
reward against its group's mean. `batch_size` counts completions, so every step trains on
batch_size x grad_accum / num_generations prompts. RLOO (trainers/rloo.py) shares this code.
"""

from __future__ import annotations

from pydantic import Field

from synth.errors import ConfigError
from trainers.common import (
    last_checkpoint,
    load_tokenizer,
    peft_config,
    pick_device,
    split,
    trl_args,
)
from trainers.config import TrainResult
from trainers.rl_common import (
    RLSettings,
    evaluation_prompts,
    finish,
    fit_prompts,
    load_prompts,
    load_reward_model,
    mean_sampled_reward,
    numbers,
    policy_dir,
    reward_model_dir,
    reward_tokenizer,
)

CURVES = ["reward", "reward_std", "kl", "loss", "entropy", "completions/mean_length"]


class GroupSettings(RLSettings):
    """Sampling several completions per prompt and scoring each against its group."""

    beta: float = Field(0.05, ge=0, description="KL(policy || reference) coefficient (0: no reference model is loaded).")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt; must divide batch_size x grad_accum.")
    max_completion_length: int = Field(64, ge=1, description="Tokens sampled per completion (stops earlier at EOS).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each batch of samples.")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the policy ratio.")


class GRPOSettings(GroupSettings):
    """GRPO: group-relative advantages, rewards scaled by their group's spread."""


def build_trainer(config: GroupSettings, trainer_class, config_class, extra_args: dict | None = None):
    """(GRPO- or RLOOTrainer, eval prompts, metrics so far) for a config."""
    per_step = config.batch_size * config.grad_accum
    if per_step % config.num_generations:
        raise ConfigError(
            f"num_generations={config.num_generations} must divide batch_size x grad_accum = {per_step} "
            "(batch_size counts completions: prompts per step x num_generations)"
        )
    if config.eval_fraction > 0 and config.batch_size % config.num_generations:
        raise ConfigError(f"num_generations={config.num_generations} must divide batch_size={config.batch_size} to evaluate held-out prompts")
    reward_model_dir(config)  # fail before loading anything
    path = policy_dir(config)
    tokenizer = load_tokenizer(path, config)
    prompts, skipped = fit_prompts(load_prompts(config.data), tokenizer, config)
    train_set, held_out = split(prompts, config)
    _, dtype, _ = pick_device(config)
    args = config_class(
        **trl_args(config),
        beta=config.beta,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        num_iterations=config.num_iterations,
        epsilon=config.epsilon,
        # TRL loads the policy and the reference from the student's path with these: same dtype, never downloaded
        model_init_kwargs={"dtype": str(dtype).removeprefix("torch."), "local_files_only": True, "trust_remote_code": config.trust_remote_code},
        **(extra_args or {}),
    )
    trainer = trainer_class(
        model=str(path),
        reward_funcs=load_reward_model(config),
        args=args,
        train_dataset=train_set,
        eval_dataset=held_out,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer(config, tokenizer),
        peft_config=peft_config(config),
    )
    eval_prompts = evaluation_prompts(train_set, held_out, config)
    before = mean_sampled_reward(
        trainer.model, tokenizer, trainer.reward_funcs[0], trainer.reward_processing_classes[0], eval_prompts, config, config.max_completion_length
    )
    return trainer, eval_prompts, {"reward_before": before, "prompts_skipped": float(skipped)}


def run(config: GroupSettings, trainer_class, config_class, extra_args: dict | None = None) -> TrainResult:
    """Train (resuming from the last checkpoint when asked), then save the policy, metrics and curves."""
    trainer, eval_prompts, metrics = build_trainer(config, trainer_class, config_class, extra_args)
    output = trainer.train(resume_from_checkpoint=last_checkpoint(config.output_dir) if config.resume else None)
    metrics.update(numbers(output.metrics))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if config.lora and config.merge_lora:
        policy = policy.merge_and_unload()
    reward_tok = trainer.reward_processing_classes[0]
    metrics["reward_after"] = mean_sampled_reward(
        policy, trainer.processing_class, trainer.reward_funcs[0], reward_tok, eval_prompts, config, config.max_completion_length
    )
    finish(policy, load_tokenizer(policy_dir(config), config), config, trainer.state.log_history, metrics, CURVES)
    return TrainResult(output_dir=config.output_dir, metrics=metrics)


def train(config: GRPOSettings) -> TrainResult:
    """Run GRPO from the student against the reward model; returns the saved policy and its metrics."""
    from trl import GRPOConfig, GRPOTrainer

    return run(config, GRPOTrainer, GRPOConfig)


#: `distill train grpo`: discovered by the CLI through these two names.
METHOD = "grpo"
CONFIG = GRPOSettings

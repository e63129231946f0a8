"""GRPO: TRL's GRPOTrainer with the reward model as its reward function, maximising r(x, y) - beta * KL(policy || SFT student).

Each prompt gets `num_generations` sampled completions; each completion's advantage is its
reward against its group's mean. `batch_size` counts completions, so every step trains on
batch_size x grad_accum / num_generations prompts. RLOO (trainers/rloo.py) shares this code.
"""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer

from synth.errors import ConfigError
from trainers.common import last_checkpoint, peft_config, pick_device, trl_args
from trainers.rl_common import finish, load_reward_model, mean_sampled_reward, numbers, reward_tokenizer, start
from trainers.settings import GroupSettings, GRPOSettings, TrainResult

CURVES = ["reward", "reward_std", "kl", "loss", "entropy", "completions/mean_length"]


def build_trainer(config: GroupSettings, trainer_class, config_class, extra_args: dict | None = None):
    """(GRPO- or RLOOTrainer, where it started, metrics so far) for a config."""
    per_step = config.batch_size * config.grad_accum
    if per_step % config.num_generations:
        raise ConfigError(
            f"num_generations={config.num_generations} must divide batch_size x grad_accum = {per_step} "
            "(batch_size counts completions: prompts per step x num_generations)"
        )
    if config.eval_fraction > 0 and config.batch_size % config.num_generations:
        raise ConfigError(f"num_generations={config.num_generations} must divide batch_size={config.batch_size} to evaluate held-out prompts")
    begin = start(config)
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
        model=str(begin.policy),
        reward_funcs=load_reward_model(config),
        args=args,
        train_dataset=begin.train,
        eval_dataset=begin.held_out,
        processing_class=begin.tokenizer,
        reward_processing_classes=reward_tokenizer(config, begin.tokenizer),
        peft_config=peft_config(config),
    )
    before = mean_sampled_reward(
        trainer.model, begin.tokenizer, trainer.reward_funcs[0], trainer.reward_processing_classes[0], begin.reward_prompts, config,
        config.max_completion_length,
    )  # fmt: skip
    return trainer, begin, {"reward_before": before, "prompts_skipped": float(begin.skipped)}


def run(config: GroupSettings, trainer_class, config_class, extra_args: dict | None = None) -> TrainResult:
    """Train (resuming from the last checkpoint when asked), then save the policy, metrics and curves."""
    trainer, begin, metrics = build_trainer(config, trainer_class, config_class, extra_args)
    output = trainer.train(resume_from_checkpoint=last_checkpoint(config.output_dir) if config.resume else None)
    metrics.update(numbers(output.metrics))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    return finish(
        policy, trainer.processing_class, trainer.reward_funcs[0], trainer.reward_processing_classes[0], begin, config,
        config.max_completion_length, trainer.state.log_history, metrics, CURVES,
    )  # fmt: skip


def train(config: GRPOSettings) -> TrainResult:
    """Run GRPO from the student against the reward model; returns the saved policy and its metrics."""
    return run(config, GRPOTrainer, GRPOConfig)


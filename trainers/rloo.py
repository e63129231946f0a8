"""RLOO: TRL's RLOOTrainer with the reward model as its reward function, maximising r(x, y) - beta * KL(policy || SFT student).

Like GRPO (whose code and settings it shares), but each completion's baseline is the mean
reward of the other completions of its prompt (leave one out).
"""

from __future__ import annotations

from trainers.config import TrainResult
from trainers.grpo import GroupSettings, run


class RLOOSettings(GroupSettings):
    """RLOO: leave-one-out baselines over each prompt's completions."""


def train(config: RLOOSettings) -> TrainResult:
    """Run RLOO from the student against the reward model; returns the saved policy and its metrics."""
    from trl import RLOOConfig, RLOOTrainer

    return run(config, RLOOTrainer, RLOOConfig)


#: `distill train rloo`: discovered by the CLI through these two names.
METHOD = "rloo"
CONFIG = RLOOSettings

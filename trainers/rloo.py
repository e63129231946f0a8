"""RLOO: TRL's RLOOTrainer with the reward model as its reward function, maximising r(x, y) - beta * KL(policy || SFT student).

Like GRPO (whose code and settings it shares), but each completion's baseline is the mean
reward of the other completions of its prompt (leave one out).
"""

from __future__ import annotations

from trl import RLOOConfig, RLOOTrainer

from trainers.grpo import run
from trainers.settings import RLOOSettings, TrainResult


def train(config: RLOOSettings) -> TrainResult:
    """Run RLOO from the student against the reward model; returns the saved policy and its metrics."""
    return run(config, RLOOTrainer, RLOOConfig)


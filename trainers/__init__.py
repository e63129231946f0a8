"""Distillation on TRL: one module per method with train(settings) -> TrainResult; every method's settings in trainers/settings.py.

METHODS is what `distill train` and recipes offer. A method's module imports torch and TRL
(seconds), so it is imported only when that method trains; its settings model (pydantic
only) is all the CLI needs to declare flags and check a recipe's keys.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from trainers.settings import (
    DPOSettings,
    GKDSettings,
    GRPOSettings,
    KDSettings,
    PPOSettings,
    RewardSettings,
    RLOOSettings,
    SFTSettings,
    TrainResult,
    TrainSettings,
)


class Method(NamedTuple):
    """One `distill train METHOD`: where its trainer is, what it is configured by, and its one-line help."""

    module: str
    settings: type[TrainSettings]
    summary: str
    #: The record kinds its data may hold (records.py's `kind`); empty: any record with a prompt, not checked.
    reads: tuple[str, ...] = ()


#: `distill train` lists these in this order; each summary is the first line of the module's docstring.
METHODS: dict[str, Method] = {
    "dpo": Method("trainers.dpo", DPOSettings, "DPO: TRL's DPOTrainer on preference pairs, with β and its loss variants exposed.", ("preference",)),
    "gkd": Method("trainers.gkd", GKDSettings, "GKD: on-policy distillation from a white-box teacher held locally (TRL's experimental GKDTrainer).", ("sft",)),
    "grpo": Method(
        "trainers.grpo",
        GRPOSettings,
        "GRPO: TRL's GRPOTrainer with the reward model as its reward function, maximising r(x, y) - beta * KL(policy || SFT student).",
    ),
    "kd": Method("trainers.kd", KDSettings, "KD: SFT plus a sparse divergence to the teacher's top-k logprobs stored with each example.", ("sft",)),
    "ppo": Method(
        "trainers.ppo",
        PPOSettings,
        "PPO: TRL's PPOTrainer against a reward model, maximising r(x, y) - kl_coef * KL(policy || SFT student).",
    ),
    "reward": Method(
        "trainers.reward",
        RewardSettings,
        "Reward model: TRL's RewardTrainer (Bradley–Terry) on preference pairs, with held-out pairwise accuracy.",
        ("preference",),
    ),
    "rloo": Method(
        "trainers.rloo",
        RLOOSettings,
        "RLOO: TRL's RLOOTrainer with the reward model as its reward function, maximising r(x, y) - beta * KL(policy || SFT student).",
    ),
    "sft": Method(
        "trainers.sft",
        SFTSettings,
        "SFT: TRL's SFTTrainer on prompt/completion records or multi-turn messages, learning the answers (assistant turns) only.",
        ("sft",),
    ),
}


def train(method: str, settings: TrainSettings) -> TrainResult:
    """Check the device, output folder and trackers, then train with the method's module (imported now)."""
    # Imported here, not at the top: trainers.common loads torch and transformers, which `distill --help` must not pay for.
    from trainers.common import preflight

    preflight(settings)
    return importlib.import_module(METHODS[method].module).train(settings)

"""Settings every trainer shares; each method's config extends `TrainConfig`.

Every field maps one-to-one onto a recipe YAML key and a `distill train` flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from synth.teachers.config import check_device_name


def _steps(value: int) -> int:
    # 0 would train for no step (or, in TRL, silently fall back to epochs): neither is what anyone asked for.
    if value == 0 or value < -1:
        raise ValueError("must be at least 1, or -1 to train for `epochs`")
    return value


#: Checked in the type (not a model validator) so a `--max-steps` flag is refused as it is parsed.
Steps = Annotated[int, AfterValidator(_steps)]
DeviceName = Annotated[str, AfterValidator(check_device_name)]


class TrainConfig(BaseModel):
    """The student, the data, the optimiser and where the result goes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field("embedded", description="Student: a local Hugging Face model directory, or 'embedded' (SmolLM2-135M-Instruct).")
    data: Path = Field(Path("out/demo/gsm8k_cot.jsonl"), description="Records written by a distill synth command (JSON Lines).")
    output_dir: Path = Field(Path("out/student"), description="Where the trained model, metrics and plots go.")
    max_steps: Steps = Field(20, description="Optimiser steps (-1: train for `epochs`).")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is -1.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Steps of gradient accumulation.")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer ones are truncated.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming the learning rate up.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Held-out fraction of the data for evaluation metrics.")
    seed: int = Field(0, description="Seed for shuffling, initialisation and dropout.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    resume: bool = Field(True, description="Resume from the last checkpoint in output_dir if there is one.")
    device: DeviceName = Field("auto", description="cpu, cuda, cuda:N or auto.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPUs that support it, else fp32.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")
    lora: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on LoRA inputs.")
    lora_target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], description="Modules to adapt.")
    merge_lora: bool = Field(True, description="Merge the adapters into the saved model, so it loads with AutoModelForCausalLM alone.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~30 % slower; for large students.")
    report_to: list[str] = Field(default_factory=list, description="Trackers (wandb, tensorboard, ...); none by default.")


class TrainResult(BaseModel):
    """What a trainer produced."""

    output_dir: Path
    metrics: dict[str, float] = Field(default_factory=dict)

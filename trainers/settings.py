"""The settings of every trainer and of `distill eval`: pydantic models, nothing heavier.

Every field maps one-to-one onto a recipe YAML key and a `distill train` (or `distill eval`)
flag. They live apart from the trainers so the CLI declares every method's flags without
importing torch or TRL; each method's settings extend `TrainSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from synth.errors import ConfigError
from synth.teachers.config import check_device_name


def _steps(value: int) -> int:
    # 0 would train for no step (or, in TRL, silently fall back to epochs): neither is what anyone asked for.
    if value == 0 or value < -1:
        raise ValueError("must be at least 1, or -1 to train for `epochs`")
    return value


#: Checked in the type (not a model validator) so a `--max-steps` flag is refused as it is parsed.
Steps = Annotated[int, AfterValidator(_steps)]
DeviceName = Annotated[str, AfterValidator(check_device_name)]

# TRL's configs start at the peak rate (warmup 0); published recipes warm up, SFT briefly, preference tuning longer.
SFT_WARMUP = "Fraction of steps warming the learning rate up from 0: 3 %, as Alpaca's and Vicuna's SFT recipes, keeps Adam's noisy first updates small."
ALIGNMENT_WARMUP = "Fraction of steps warming the learning rate up from 0: 10 %, as the alignment handbook's DPO recipe and TRL's KTO example."
ONE_EPOCH = "Passes over the data when max_steps is -1: one, as TRL's DPO example, since preference and RL training overfit quickly."


def rate_field(value: float, source: str):
    """The `learning_rate` field with a method's default and where that default comes from."""
    return Field(value, gt=0, description=f"Peak learning rate: {source}.")


def require_data(settings: TrainSettings) -> Path:
    """The records file the settings name; a ConfigError naming the flag and the key when none is given.

    There is no default: a default file would train on whatever demo data happened to be there.
    """
    if settings.data is None:
        raise ConfigError("no training data: pass --data FILE.jsonl (in a --config file or a recipe stage: data: FILE.jsonl), "
                          "the records a distill synth command wrote")
    return settings.data


class TrainSettings(BaseModel):
    """The student, the data, the optimiser and where the result goes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field("embedded", description="Student: a local Hugging Face model directory, or 'embedded' (SmolLM2-135M-Instruct).")
    # Checked by require_data when a trainer runs (and by `distill train` and recipes before): a model
    # without it still builds, so a program can make settings first and name the data later.
    data: Path | None = Field(None, description="Records written by a distill synth command (JSON Lines); required.")
    output_dir: Path = Field(Path("out/student"), description="Where the trained model, metrics and plots go.")
    max_steps: Steps = Field(-1, description="Optimiser steps; -1: train for `epochs` passes over the data.")
    epochs: float = Field(3.0, gt=0, description="Passes over the data when max_steps is -1: three, TRL's configs' default.")
    learning_rate: float = rate_field(2e-5, "TRL's SFTConfig default, which its GKDConfig inherits")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Steps of gradient accumulation.")
    max_length: int = Field(
        2048, ge=8, description="Tokens per example: room for the synth commands' longest answers (512 to 1024 tokens) and their prompts."
    )
    max_truncated: float = Field(
        0.05, ge=0, le=1,
        description="Largest share of examples max_length may cut (a cut answer loses its end and EOS); above it training stops before it starts.",
    )  # fmt: skip
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description=SFT_WARMUP)
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


class SFTSettings(TrainSettings):
    """Supervised fine-tuning on the teacher's answers."""

    packing: bool = Field(False, description="Pack several short examples into each max_length sequence.")
    completion_only_loss: bool = Field(True, description="prompt/completion data: learn the answers only, not the prompts.")
    assistant_only_loss: bool = Field(
        True, description="messages data: learn the assistant turns only, not the system and user turns (works with any chat template)."
    )


class KDSettings(SFTSettings):
    """Token-level distillation from the teacher's stored top-k logprobs."""

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the cross-entropy on the teacher's tokens; 1 - alpha weighs the divergence.")
    temperature: float = Field(1.0, gt=0, description="Softening temperature T applied to both top-k distributions (the divergence is scaled by T^2).")
    divergence: Literal["forward", "reverse", "jsd", "logit_mse"] = Field(
        "forward", description="forward KL(teacher||student), reverse KL, generalised JSD(beta), or MSE of logits centred over the top-k."
    )
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight: M = beta * teacher + (1 - beta) * student.")
    chunk_size: int = Field(
        256, ge=0, description="Labelled tokens per chunk of the output layer (memory chunk x vocabulary); 0: full logits, for any model."
    )
    teacher_tokenizer: str | None = Field(
        None, description="The teacher's tokenizer directory (or 'embedded'), when the records name none or a name not on this machine."
    )
    token_strings_only: bool = Field(
        False,
        description="Accept soft labels that name no tokenizer (an HTTP teacher without `tokenizer:`): map each candidate token "
        "string to the student's vocabulary and skip the rows whose tokens do not match.",
    )

    @model_validator(mode="after")
    def _aligned_rows(self) -> "KDSettings":
        if self.packing:
            raise ValueError("KD cannot pack rows: each row carries its own soft labels; set packing to false")
        if not self.completion_only_loss:
            raise ValueError("KD aligns the soft labels with the completion tokens; completion_only_loss must stay true")
        if not self.assistant_only_loss:
            raise ValueError("KD learns a chat's last assistant turn, where its soft labels are; assistant_only_loss must stay true")
        return self


class GKDSettings(TrainSettings):
    """Generalised knowledge distillation from a local teacher model."""

    teacher_model: str = Field("embedded", description="Teacher: a local Hugging Face model directory, or 'embedded'; must share the student's tokenizer.")
    lmbda: float = Field(0.5, ge=0, le=1, description="Fraction of steps trained on the student's own samples (on-policy) instead of the records.")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD weight: 0 forward KL, 1 reverse KL, 0.5 symmetric JSD.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the on-policy answers.")
    max_new_tokens: int = Field(128, ge=1, description="Longest on-policy answer, in tokens.")


#: The values trl 1.12's DPOConfig.loss_type accepts (tests check this against TRL's own list).
LossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]


class DPOSettings(TrainSettings):
    """Direct preference optimisation of the student on chosen/rejected pairs."""

    learning_rate: float = rate_field(1e-6, "TRL's DPOConfig default")
    epochs: float = Field(1.0, gt=0, description=ONE_EPOCH)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description=ALIGNMENT_WARMUP)
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (τ for the ipo loss).")
    loss_type: LossType = Field("sigmoid", description="DPO loss variant: sigmoid is the original DPO, ipo, hinge, robust, ... as in TRL.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability a preference label is flipped (robust) or ε (exo_pair, which needs it > 0)."
    )
    ref_model: str | None = Field(
        None, description="Reference model dir (same tokenizer); default: a frozen copy of the student, or the student with adapters off under LoRA."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Score the pairs with the reference once before training, so it need not stay in memory."
    )

    @model_validator(mode="after")
    def _exo_needs_smoothing(self):
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (1e-3 is usual)")
        return self


class RewardSettings(TrainSettings):
    """A scalar reward model r(prompt, answer) trained so that r(chosen) > r(rejected)."""

    output_dir: Path = Field(Path("out/reward"), description="Where the reward model goes (PPO, GRPO and RLOO read it from here by default).")
    learning_rate: float = rate_field(1e-4, "TRL's RewardConfig default")
    epochs: float = Field(1.0, gt=0, description=ONE_EPOCH.replace("TRL's DPO example", "InstructGPT's reward models"))
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description=ALIGNMENT_WARMUP)
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Held-out fraction of the pairs; pairwise accuracy is measured on it.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of a penalty on the mean reward, keeping rewards centred on zero (0.01 is usual; off by default)."
    )


class RLSettings(TrainSettings):
    """Settings every RL method has: the reward model, sampling, and the before/after reward check."""

    learning_rate: float = rate_field(1e-6, "TRL's GRPOConfig and RLOOConfig default")
    epochs: float = Field(1.0, gt=0, description=ONE_EPOCH)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description=ALIGNMENT_WARMUP)
    max_length: int = Field(2048, ge=8, description="Longest prompt, in tokens: longer prompts are skipped (see max_truncated).")
    max_truncated: float = Field(
        0.05, ge=0, le=1, description="Largest share of prompts max_length may skip; above it training stops before it starts."
    )
    reward_model: Path = Field(
        Path("out/reward"),
        description="Reward model: a sequence-classification model directory with one output (e.g. from `distill train reward`).",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the policy's completions.")
    reward_eval_prompts: int = Field(
        16, ge=0, description="Prompts sampled before and after training to report the mean reward (held-out ones when eval_fraction > 0; 0: skip)."
    )
    reward_eval_samples: int = Field(4, ge=1, description="Completions sampled per prompt for that before/after reward.")


class GroupSettings(RLSettings):
    """Sampling several completions per prompt and scoring each against its group."""

    beta: float = Field(0.05, ge=0, description="KL(policy || reference) coefficient (0: no reference model is loaded).")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt; must divide batch_size x grad_accum.")
    max_completion_length: int = Field(64, ge=1, description="Tokens sampled per completion (stops earlier at EOS).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each batch of samples.")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the policy ratio.")


class GRPOSettings(GroupSettings):
    """GRPO: group-relative advantages, rewards scaled by their group's spread."""


class RLOOSettings(GroupSettings):
    """RLOO: leave-one-out baselines over each prompt's completions."""


class PPOSettings(RLSettings):
    """PPO against a reward model, with a value model and a KL penalty to the starting student."""

    learning_rate: float = rate_field(3e-6, "TRL's PPOConfig default")
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the KL(policy || reference) penalty in the reward.")
    response_length: int = Field(64, ge=1, description="Tokens sampled per completion (stops earlier at EOS).")
    num_ppo_epochs: int = Field(4, ge=1, description="PPO passes over each batch of samples.")
    num_mini_batches: int = Field(1, ge=1, description="Minibatches each batch is split into per PPO pass.")
    cliprange: float = Field(0.2, gt=0, description="PPO clipping range of the policy ratio.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator in the reward: k1 (unbiased) or k3 (lower variance).")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of completions that never end (none by default).")


class EvalSettings(BaseModel):
    """Which students, which teacher, which prompts, and how long the answers may be."""

    model_config = ConfigDict(extra="forbid")

    students: list[str] = Field(default_factory=lambda: ["out/student"], description="Student model directories ('embedded' works too); compared in one table.")
    teacher: str = Field("embedded", description="Teacher spec: embedded, hf:PATH, vllm:MODEL, openai:MODEL@BASE_URL or a teacher .yaml file.")
    prompts: Path = Field(Path("data/gsm8k/train.jsonl"), description="Held-out prompts (JSONL): {question, answer?} or {prompt, reference?}; prompt may be text or chat messages.")
    before: str | None = Field(None, description="The student before training: its NLL gives the fraction of the gap to the teacher closed.")
    limit: int | None = Field(50, ge=1, description="Evaluate at most this many prompts.")
    skip: int = Field(0, ge=0, description="Skip this many prompts first (e.g. the ones training used).")
    max_new_tokens: int = Field(256, ge=1, description="Longest student answer (greedy).")
    teacher_max_tokens: int | None = Field(None, ge=1, description="Longest teacher answer (default: max_new_tokens).")
    judge: str | None = Field(None, description="Judge teacher spec for pairwise win rates against the teacher (order swapped); none by default.")
    judge_max_tokens: int = Field(16, ge=1, description="Longest judge reply.")
    template: str | None = Field("label/cot", description="Template that turns a {question} into the prompt, as labeling does ('none': the question as is).")
    lang: Literal["en", "zh"] = Field("en", description="Template language.")
    demonstrations: Path | None = Field(None, description="Worked examples shown in the prompt (JSONL of {question, answer}), as labeling was given them.")
    checker: str = Field("numeric", description="How answers are compared: numeric, exact, or module:function.")
    batch_size: int = Field(8, ge=1, description="Prompts per batch for student generation and NLL.")
    output_dir: Path = Field(Path("out/eval"), description="Where eval.json, report.md and the plots go.")
    cache_dir: Path | None = Field(None, description="Response cache directory (default: $BBD_RESPONSE_CACHE or ~/.cache/blackbox-distill/responses).")
    cache_mode: Literal["use", "refresh", "off"] = Field("use", description="use: read and store; refresh: ask again and overwrite; off: neither.")
    device: DeviceName = Field("auto", description="cpu, cuda, cuda:N or auto (for students and the teacher's NLL floor).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on GPUs that support it, else fp32.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a checkpoint.")

    @field_validator("template")
    @classmethod
    def _no_template(cls, value: str | None) -> str | None:
        """'none' (or empty) from a flag or file means no template."""
        return None if value is None or value.strip().lower() in ("", "none", "null") else value

"""What PPO, GRPO and RLOO share: prompts, the reward model, the mean sampled reward, saving.

Each of them maximises r(x, y) - beta * KL(pi || pi_ref): the reward model scores a sampled
completion y of a prompt x, and the KL term keeps the policy near the starting student.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from synth.errors import ConfigError, InputError
from synth.io import read_jsonl, to_hf_dataset
from trainers.common import load_tokenizer, pick_device, plot_history, resolve_model, save_model, split
from trainers.lengths import check_truncation
from trainers.settings import RLSettings, TrainResult, require_data


class Start(NamedTuple):
    """What every RL method starts from, checked and loaded in the same order by each."""

    policy: Path  # the starting student's directory
    tokenizer: Any  # its tokenizer
    train: Dataset  # the prompts to train on (one `prompt` column)
    held_out: Dataset | None  # held-out prompts (eval_fraction), or None
    reward_prompts: list  # the prompts the before/after reward is measured on
    skipped: int  # prompts longer than max_length, left out


def start(config: RLSettings) -> Start:
    """Check the reward model (before anything loads), then load the policy's tokenizer and the prompts that fit, split."""
    reward_model_dir(config)
    path = policy_dir(config)
    tokenizer = load_tokenizer(path, config)
    prompts, skipped = fit_prompts(load_prompts(require_data(config)), tokenizer, config)
    train, held_out = split(prompts, config)
    return Start(path, tokenizer, train, held_out, evaluation_prompts(train, held_out, config), skipped)


def load_prompts(path: Path):
    """A Dataset with one `prompt` column from our records (SFT, preference, messages) or a plain JSONL of {"prompt": ...}."""
    first = next(iter(read_jsonl(path)))[1]
    if isinstance(first, dict) and "kind" in first:
        dataset = to_hf_dataset(path)
        if "prompt" in dataset.column_names:
            return dataset.select_columns(["prompt"])
        if "messages" in dataset.column_names:
            return Dataset.from_list([{"prompt": prompt_of(m, path)} for m in dataset["messages"]])
        raise InputError(f"{path}: these records have no prompts (columns {sorted(set(dataset.column_names) - {'id'})})")
    rows = []
    for lineno, obj in read_jsonl(path):
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise InputError(f'{path}:{lineno}: field \'prompt\': expected a string or a list of messages (a line like {{"prompt": "..."}})')
        if rows and isinstance(prompt, str) != isinstance(rows[0]["prompt"], str):
            raise InputError(f"{path}:{lineno}: field 'prompt': mixes plain-text prompts and message lists; use one form per file")
        rows.append({"prompt": prompt})
    return Dataset.from_list(rows)


def prompt_of(messages: list[dict], path: Path) -> list[dict]:
    """The turns before a conversation's last assistant message: what the policy answers."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            if i == 0:
                break
            return messages[:i]
    raise InputError(f"{path}: a 'messages' record has no user turn before an assistant turn to use as a prompt")


def prompt_text(prompt, tokenizer) -> str:
    """A prompt as the policy sees it: chat-templated with the generation prompt when conversational."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def fit_prompts(dataset, tokenizer, config: RLSettings):
    """The prompts that fit in max_length tokens, and how many longer ones are skipped (an InputError above max_truncated)."""
    lengths = [len(tokenizer(prompt_text(p, tokenizer), add_special_tokens=False)["input_ids"]) for p in dataset["prompt"]]
    # Skipped, not cut: a prompt cut short asks another question (or loses the chat template's generation prompt).
    skipped = check_truncation(lengths, config, "prompts", "skipped")
    keep = [i for i, n in enumerate(lengths) if n <= config.max_length]
    if not keep:
        raise InputError(f"{config.data}: every prompt is longer than max_length={config.max_length} tokens")
    return dataset.select(keep), skipped


def reward_model_dir(config: RLSettings) -> Path:
    """The reward model's directory, checked to be a one-output sequence classifier."""
    path = Path(config.reward_model).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"reward_model {str(path)!r}: no Hugging Face model directory there (config.json missing); train one with `distill train reward`")
    model_config = json.loads(config_file.read_text())
    architectures = model_config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(f"reward_model {str(path)!r}: a {architectures or 'model'} is not a sequence-classification model")
    labels = len(model_config.get("id2label") or {0: ""})
    if model_config.get("num_labels", labels) != 1:
        raise ConfigError(f"reward_model {str(path)!r}: has {labels} outputs; a reward model has exactly one")
    return path


def load_reward_model(config: RLSettings, path: Path | None = None):
    """The reward model (or a value model copy of it) in the training dtype."""
    _, dtype, _ = pick_device(config)
    return AutoModelForSequenceClassification.from_pretrained(
        str(path or reward_model_dir(config)), num_labels=1, dtype=dtype, local_files_only=True, trust_remote_code=config.trust_remote_code
    )


def reward_tokenizer(config: RLSettings, policy_tokenizer):
    """The tokenizer saved beside the reward model, or the policy's when there is none."""
    path = reward_model_dir(config)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return policy_tokenizer
    return load_tokenizer(path, config)


def evaluation_prompts(train, evaluation, config: RLSettings) -> list:
    """The prompts the before/after reward is measured on: held-out ones when there are, else the first train ones."""
    source = evaluation if evaluation is not None else train
    return list(source["prompt"][: config.reward_eval_prompts])


def mean_sampled_reward(policy, tokenizer, reward_model, reward_tok, prompts: list, config: RLSettings, max_new_tokens: int) -> float:
    """Mean reward of `reward_eval_samples` completions sampled per prompt (seeded), scored as GRPO scores them."""
    if not prompts:
        return float("nan")
    torch.manual_seed(config.seed)
    device = next(policy.parameters()).device
    reward_model.config.pad_token_id = reward_tok.pad_token_id  # the classifier reads the last non-pad token
    was_training = policy.training
    policy.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(prompts), 8):
            chunk = prompts[start : start + 8]
            texts = [prompt_text(p, tokenizer) for p in chunk]
            # left padding: generation continues from the right end
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
            out = policy.generate(
                **enc, do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                num_return_sequences=config.reward_eval_samples, pad_token_id=tokenizer.pad_token_id,
            )
            completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            repeated = [p for p in chunk for _ in range(config.reward_eval_samples)]
            texts = [scored_text(p, c, reward_tok) for p, c in zip(repeated, completions)]
            rin = reward_tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
            rin = rin.to(next(reward_model.parameters()).device)
            scores.append(reward_model(**rin).logits[:, 0].float().cpu())
    policy.train(was_training)
    return float(torch.cat(scores).mean())


def scored_text(prompt, completion: str, reward_tok) -> str:
    """Prompt and completion as the reward model reads them (the chat template for conversations)."""
    if isinstance(prompt, list):
        return reward_tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    return prompt + completion


def finish(policy, sampler, reward_model, reward_tok, start: Start, config: RLSettings, max_new_tokens: int,
           history: list[dict[str, Any]], metrics: dict[str, float], curves: list[str]) -> TrainResult:  # fmt: skip
    """Merge LoRA when asked, measure the reward after training, then save the policy, metrics.json and curves of `curves`.

    `sampler` is the tokenizer the policy trained with; the saved one is the student's own, unchanged.
    """
    if config.lora and config.merge_lora:
        policy = policy.merge_and_unload()
    metrics["reward_after"] = mean_sampled_reward(policy, sampler, reward_model, reward_tok, start.reward_prompts, config, max_new_tokens)
    save_model(policy, load_tokenizer(start.policy, config), config)
    (config.output_dir / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=2))
    rows = [{k: v for k, v in row.items() if k in curves or k == "step"} for row in history]
    plot_history([row for row in rows if len(row) > 1], config.output_dir / "training_curves.png")
    return TrainResult(output_dir=config.output_dir, metrics=metrics)


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a log row or TRL metrics dict."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def policy_dir(config: RLSettings) -> Path:
    """The starting policy (the SFT student)."""
    return resolve_model(config.model, config.trust_remote_code)

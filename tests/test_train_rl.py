"""PPO, GRPO and RLOO on a tiny Llama against a toy reward model: the mean reward rises and the policy reloads.

The toy reward model is a real LlamaForSequenceClassification whose weights are set by hand
so that its score grows with the share of digit tokens ("7", " 42", ...) in the text: the
attention averages a "this token is a digit" feature over the sequence and the score head
reads it. A random tiny policy writes digits about 12 % of the time, so every method has a
signal from its first step; training must make it write more of them.
"""

from __future__ import annotations

import json

import pytest

from synth.errors import ConfigError, InputError
from tests.tiny_models import (
    make_tiny_llama,
    write_preference_records,
    write_sft_records,
)

# Fast settings shared by the three methods: high learning rate from the first step, short completions.
COMMON = dict(max_steps=10, learning_rate=1e-2, warmup_ratio=0, seed=0, save_steps=1000, reward_eval_prompts=8, reward_eval_samples=8)
GROUP = dict(COMMON, max_steps=20, batch_size=32, num_generations=8, max_completion_length=12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: with two on a shared 2-core machine these tiny steps run 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def digit_ids(tokenizer) -> list[int]:
    """Tokens that are a number, with or without the byte-level space marker."""
    return [i for t, i in tokenizer.get_vocab().items() if t.lstrip("Ġ").isascii() and t.lstrip("Ġ").isdigit()]


def make_digit_reward_model(policy_dir, out, scale: float = 10.0):
    """A 1-layer LlamaForSequenceClassification scoring scale * g(share of digit tokens), g increasing.

    Embeddings are [1,0,0,0] (other) or [0,1,0,0] (digit); zero queries and keys make the
    attention a plain average over the sequence, which o_proj writes to dimension 2; the MLP is
    off, and the score head reads dimension 2 after the final RMSNorm: 4f / sqrt(1 + 4f^2).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        embeddings = model.model.embed_tokens.weight
        embeddings[:, 0] = 1.0
        embeddings[digit_ids(tok), 0] = 0.0
        embeddings[digit_ids(tok), 1] = 1.0
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight.copy_(torch.eye(4))
        attention.o_proj.weight[2, 1] = 1.0
        model.score.weight[0, 2] = scale
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def reward_dir(tiny, tmp_path_factory):
    return make_digit_reward_model(tiny, tmp_path_factory.mktemp("rm") / "reward")


def digit_share(model_dir, prompts: list[str], tokenizer) -> float:
    """Share of digit tokens in completions sampled (seeded) from a saved model: the toy's ground truth."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    torch.manual_seed(1)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=12, num_return_sequences=8, pad_token_id=tokenizer.pad_token_id)
    completion = out[:, enc["input_ids"].shape[1] :]
    return torch.isin(completion, torch.tensor(digit_ids(tokenizer))).float().mean().item()


def assert_reward_rose(result, out, tiny):
    """Reported and independently measured: the policy writes more of what the reward model likes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before, after = result.metrics["reward_before"], result.metrics["reward_after"]
    assert after > before + 2.0, (before, after)
    tok = AutoTokenizer.from_pretrained(str(tiny))
    prompts = [f"What color is the {t}?" for t in ("apple", "sky", "grass", "sun")]
    base, trained = digit_share(tiny, prompts, tok), digit_share(out, prompts, tok)
    assert trained > base + 0.2, (base, trained)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("score" in k or "value" in k for k in model.state_dict())  # no value head leaked
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] and metrics["final"]["reward_after"] == after
    assert (out / "training_curves.png").stat().st_size > 1000


def mean_logged(out, key: str) -> float:
    """The mean of a metric over a run's logged steps."""
    values = [row[key] for row in json.loads((out / "metrics.json").read_text())["history"] if key in row]
    return sum(values) / len(values)


def test_the_toy_reward_model_likes_digits(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reward_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir))
    texts = ["The sky is blue.", "The sky is 7.", "The sky is 7 42.", "1 2 3 4"]
    scores = model(**tok(texts, return_tensors="pt", padding=True, padding_side="right")).logits[:, 0].tolist()
    assert scores[0] == pytest.approx(0.0, abs=1e-5)
    assert scores == sorted(scores) and scores[-1] > scores[1] + 3


def test_ppo_raises_the_reward(tiny, reward_dir, tmp_path):
    from trainers.ppo import train
    from trainers.settings import PPOSettings

    data = write_sft_records(tmp_path / "sft.jsonl", 16)  # the prompts of SFT records
    out = tmp_path / "ppo"
    cfg = PPOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=out, batch_size=16, response_length=12, **COMMON)
    result = train(cfg)
    assert_reward_rose(result, out, tiny)
    assert result.metrics["objective/kl"] > 0


def test_ppo_killed_after_a_checkpoint_resumes_from_it(tiny, reward_dir, tmp_path):
    """TRL's PPOTrainer has no resume; ours continues policy, value model, optimizer, schedule and counts."""
    from transformers import TrainerCallback

    from trainers.ppo import build_trainer, train
    from trainers.settings import PPOSettings

    class Killed(Exception):
        pass

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Killed  # runs after the callback that completes the checkpoint

    data = write_sft_records(tmp_path / "sft.jsonl", 16)
    out = tmp_path / "ppo"
    cfg = PPOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=out, batch_size=8, response_length=8,
                      **dict(COMMON, max_steps=4, save_steps=2, reward_eval_prompts=4, reward_eval_samples=2))  # fmt: skip
    trainer, _, metrics = build_trainer(cfg)
    trainer.add_callback(KillAfterFirstCheckpoint())
    with pytest.raises(Killed):
        trainer.train()
    saved = json.loads((out / "checkpoint-2" / "ppo_state.json").read_text())
    assert saved == {"reward_before": metrics["reward_before"]}
    from transformers import AutoModelForSequenceClassification

    value = AutoModelForSequenceClassification.from_pretrained(str(out / "checkpoint-2" / "value_model")).state_dict()
    reward = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).state_dict()
    assert any(not value[k].equal(reward[k]) for k in value), "the checkpoint holds the trained value model"

    result = train(cfg)  # the rerun, as `distill train ppo` or a recipe does it
    history = json.loads((out / "metrics.json").read_text())["history"]
    steps = [row["step"] for row in history if "lr" in row]
    assert steps == [1, 2, 3, 4], "two updates before the kill, the two that remained after it"
    lrs = [row["lr"] for row in history if "lr" in row]
    assert lrs == sorted(lrs, reverse=True) and lrs[2] < lrs[1], f"the schedule continued instead of restarting: {lrs}"
    assert result.metrics["reward_before"] == metrics["reward_before"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    # killed after the last checkpoint, before the model was saved: the rerun trains no more and saves it
    (out / "model.safetensors").unlink()
    train(cfg)
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["step"] for row in history if "lr" in row] == [1, 2, 3, 4]
    assert (out / "model.safetensors").is_file()


def test_grpo_raises_the_reward(tiny, reward_dir, tmp_path):
    from trainers.grpo import train
    from trainers.settings import GRPOSettings

    data = write_preference_records(tmp_path / "pairs.jsonl", 16)  # the prompts of preference pairs
    out = tmp_path / "grpo"
    result = train(GRPOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=out, **GROUP))
    assert_reward_rose(result, out, tiny)
    # a large beta holds the policy near the reference: less KL, less reward
    held = train(GRPOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=tmp_path / "held", **dict(GROUP, beta=2.0)))
    assert mean_logged(tmp_path / "held", "kl") < 0.5 * mean_logged(out, "kl")
    assert held.metrics["reward_after"] < result.metrics["reward_after"]


def test_rloo_raises_the_reward_from_a_plain_prompt_file(tiny, reward_dir, tmp_path):
    from trainers.rloo import train
    from trainers.settings import RLOOSettings

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What color is the {t}?"}]}) + "\n" for t in ("apple", "sky", "coal", "snow")))
    out = tmp_path / "rloo"
    result = train(RLOOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=out, **GROUP))
    assert_reward_rose(result, out, tiny)


def test_ppo_with_lora_saves_a_merged_policy(tiny, reward_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainers.ppo import train
    from trainers.settings import PPOSettings

    out = tmp_path / "ppo-lora"
    settings = dict(COMMON, max_steps=2, reward_eval_prompts=2, reward_eval_samples=2)
    train(PPOSettings(model=str(tiny), data=write_sft_records(tmp_path / "s.jsonl", 8), reward_model=reward_dir, output_dir=out,
                      batch_size=4, response_length=4, lora=True, lora_r=4, **settings))
    assert not (out / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(str(out))


def test_plain_text_prompts_and_their_errors(tmp_path):
    from trainers.rl_common import load_prompts

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Count to three:"}\n{"prompt": "Name a color:"}\n')
    assert load_prompts(good)["prompt"] == ["Count to three:", "Name a color:"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: field 'prompt'"):
        load_prompts(bad)


def test_a_causal_lm_is_refused_as_reward_model(tiny, tmp_path):
    from trainers.grpo import train
    from trainers.settings import GRPOSettings

    data = write_sft_records(tmp_path / "sft.jsonl", 4)
    with pytest.raises(ConfigError, match="not a sequence-classification model"):
        train(GRPOSettings(model=str(tiny), data=data, reward_model=tiny, output_dir=tmp_path / "x"))


def test_num_generations_must_divide_the_batch(tiny, reward_dir, tmp_path):
    from trainers.rloo import train
    from trainers.settings import RLOOSettings

    data = write_sft_records(tmp_path / "sft.jsonl", 4)
    with pytest.raises(ConfigError, match="num_generations=3 must divide batch_size x grad_accum = 4"):
        train(RLOOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=tmp_path / "x", num_generations=3))


def test_ppo_gets_a_pad_token_apart_from_eos(tiny):
    from transformers import AutoTokenizer

    from trainers.ppo import distinct_pad

    tok = AutoTokenizer.from_pretrained(str(tiny))
    tok.pad_token = tok.eos_token  # as SmolLM2 ships: pad == EOS == the ChatML turn end inside every prompt
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True))["input_ids"]
    distinct_pad(tok, [prompt])
    assert tok.pad_token_id not in prompt and tok.pad_token_id != tok.eos_token_id


def test_prompts_longer_than_max_length_stop_before_training(tiny, reward_dir, tmp_path):
    from trainers.grpo import train
    from trainers.settings import GRPOSettings

    data = tmp_path / "prompts.jsonl"
    prompts = ["What color is the sky?"] * 6 + ["What color is the sky? " * 20] * 4
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in prompts))
    with pytest.raises(InputError, match=r"4 of 10 prompts .* longer than max_length=32 tokens and would be skipped"):
        train(GRPOSettings(model=str(tiny), data=data, reward_model=reward_dir, output_dir=tmp_path / "x", max_length=32))
    assert not (tmp_path / "x").exists()

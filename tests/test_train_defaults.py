"""`distill train`'s defaults are the ones real training wants: TRL's learning rates, epochs, warmup, no demo data."""

from __future__ import annotations

import pytest

from distill.cli import main as distill_main
from trainers import METHODS

#: Each method's default learning rate: TRL 1.12's config defaults (test_the_learning_rate_is_trls_default_for_the_method reads them).
LEARNING_RATES = {"sft": 2e-5, "kd": 2e-5, "gkd": 2e-5, "dpo": 1e-6, "reward": 1e-4, "grpo": 1e-6, "rloo": 1e-6, "ppo": 3e-6}
#: Passes over the data: SFT-like methods as TRL's configs (3); preference and RL methods one.
EPOCHS = {"sft": 3, "kd": 3, "gkd": 3, "dpo": 1, "reward": 1, "grpo": 1, "rloo": 1, "ppo": 1}


def trl_config(method: str):
    """The TRL config class each method's trainer is configured with."""
    import trl
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.ppo import PPOConfig

    return {"sft": trl.SFTConfig, "kd": trl.SFTConfig, "gkd": GKDConfig, "dpo": trl.DPOConfig, "reward": trl.RewardConfig,
            "grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig, "ppo": PPOConfig}[method]  # fmt: skip


def test_every_method_is_covered():
    assert set(LEARNING_RATES) == set(EPOCHS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_learning_rate_is_trls_default_for_the_method(method):
    settings = METHODS[method].settings
    assert settings.model_fields["learning_rate"].default == LEARNING_RATES[method]
    assert trl_config(method).__dataclass_fields__["learning_rate"].default == LEARNING_RATES[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_help_shows_the_methods_own_learning_rate(method, capsys):
    assert distill_main(["train", method, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    start = text.rindex("--learning-rate LEARNING_RATE")  # its help, after the usage line
    shown = text[start : text.index("--", start + 2)]
    default = shown[shown.index("(default: ") + len("(default: ") : shown.rindex(")")]
    assert float(default) == LEARNING_RATES[method], shown


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_defaults_train_by_epochs_with_warmup(method):
    fields = METHODS[method].settings.model_fields
    assert fields["max_steps"].default == -1, "train on the data, not for a demo's 20 steps"
    assert fields["epochs"].default == EPOCHS[method]
    assert 0 < fields["warmup_ratio"].default <= 0.1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_default_max_length_holds_a_synth_commands_answer_and_its_prompt(method):
    fields = METHODS[method].settings.model_fields
    # label and generate answer in up to 512 tokens, curate and expand in up to 1024; their prompts come on top.
    assert fields["max_length"].default >= 1024 + 512
    assert fields["max_truncated"].default == 0.05


@pytest.mark.parametrize("method", sorted(METHODS))
def test_data_has_no_demo_default_and_leaving_it_out_is_one_line_naming_the_flag(method, tmp_path, capsys):
    assert METHODS[method].settings.model_fields["data"].default is None
    code = distill_main(["train", method, "--model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "--data" in err and "data:" in err, err
    assert not (tmp_path / "out").exists()


def test_a_recipe_stage_without_data_fails_before_any_stage_runs(tmp_path):
    from distill.recipe import load_recipe
    from synth.errors import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - name: sft\n    command: train sft\n    output_dir: {tmp_path / 'o'}\n")
    with pytest.raises(ConfigError, match="stage 'sft'.*--data.*data:"):
        load_recipe(recipe)

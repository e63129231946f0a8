"""Configs from YAML files and flags: flags win, typos are named."""

import argparse
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from distill.config_flags import add_config_flags, load_config
from synth.errors import ConfigError


class Demo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, description="Steps")
    mode: Literal["fast", "slow"] = "fast"
    lora: bool = False
    names: list[str] = Field(default_factory=list)
    rate: float | None = None
    nested: dict = Field(default_factory=dict)


def parse(*argv):
    p = argparse.ArgumentParser()
    add_config_flags(p, Demo)
    return p, p.parse_args(argv)


def test_flags_override_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\nmode: slow\nnested: {a: 1}\n")
    _, args = parse("--config", str(f), "--steps", "7", "--lora", "--names", "a", "b")
    cfg = load_config(args, Demo)
    assert (cfg.steps, cfg.mode, cfg.lora, cfg.names, cfg.nested) == (7, "slow", True, ["a", "b"], {"a": 1})
    _, args = parse()
    assert load_config(args, Demo) == Demo()


def test_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("stepz: 5\n")
    _, args = parse("--config", str(f))
    with pytest.raises(ConfigError, match=r"typo\.yaml: key 'stepz': unknown key"):
        load_config(args, Demo)
    p, _ = parse()
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "medium"])

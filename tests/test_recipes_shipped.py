"""Every recipe shipped in recipes/ parses, plans (`distill run --dry-run`) and documents itself; no teacher call."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distill.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_recipes_named_in_the_readme_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "preference", "rlhf", "kd", "self_instruct", "zh_curate"} <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [n for n in names if f"recipes/{n}.yaml" not in readme]
    assert not missing, f"recipes not listed in README.md: {missing}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans_and_its_header_says_how_to_swap_the_teacher(recipe, tmp_path):
    header = "".join(line for line in recipe.read_text(encoding="utf-8").splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"teacher: \{backend: (openai|vllm)", header), f"{recipe.name}: the header shows no real-teacher block"
    loaded = load_recipe(recipe)
    for stage in loaded.stages:
        for value in stage.settings.values():
            for item in value if isinstance(value, list) else [value]:
                # Seed data the recipe reads must ship with the project (run from the repository root).
                if isinstance(item, str) and item.startswith("data/"):
                    assert (ROOT / item).exists(), f"{recipe.name}: stage '{stage.name}' reads {item}, which is not shipped"
    env = {**os.environ, "BBD_RESPONSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    plan = subprocess.run([sys.executable, "-m", "distill", "run", str(recipe), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    for i, stage in enumerate(loaded.stages, start=1):
        assert f"[{i}/{len(loaded.stages)}] {stage.name}: distill {' '.join(stage.command)}" in plan.stdout
    assert not (tmp_path / "cache").exists(), "a dry run opened the response cache"

"""A non-editable install ships prompts/ and data/ and finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_prompts_and_data_and_finds_them(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("blackbox_distill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "distill/_resources/prompts/label/cot.en.jinja" in names
    assert "distill/_resources/data/gsm8k/train.jsonl" in names
    assert "distill/_resources/data/gsm8k/LICENSE" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    probe = "from synth.paths import resource_dir; from synth.prompts import load_template; print(resource_dir('data')); print(load_template('label/cot').path)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[0].endswith("distill/_resources/data")
    assert out[1].startswith(str(target))

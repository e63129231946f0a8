"""Where the toolkit keeps its caches and finds the prompts and data it ships."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_home() -> Path:
    """Root of everything cached: $BBD_CACHE_DIR, else $XDG_CACHE_HOME/blackbox-distill, else ~/.cache/blackbox-distill."""
    explicit = os.environ.get("BBD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "blackbox-distill"


def resource_dir(name: str) -> Path:
    """A shipped top-level folder (`prompts` or `data`): `distill/_resources/NAME` in an installed wheel, else
    NAME beside the packages (a source checkout or an editable install)."""
    # Located through the import system without importing it: synth never runs distill's code.
    spec = importlib.util.find_spec("distill")
    for location in (spec.submodule_search_locations or []) if spec else []:
        installed = Path(location) / "_resources" / name
        if installed.is_dir():
            return installed
    return Path(__file__).resolve().parents[1] / name

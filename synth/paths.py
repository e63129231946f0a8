"""Where the toolkit keeps its caches and finds the prompts and data it ships."""

from __future__ import annotations

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
    """A shipped top-level folder (`prompts` or `data`), in a wheel or in a source checkout."""
    import distill

    package = Path(distill.__file__).resolve().parent
    installed = package / "_resources" / name
    if installed.is_dir():
        return installed
    # Editable installs and source checkouts: the folder beside the packages.
    return package.parent / name

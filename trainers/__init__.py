"""Distillation on TRL. Each method module defines METHOD (its `distill train` name), CONFIG and train(config)."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def methods() -> dict[str, ModuleType]:
    """Every trainer module that declares a METHOD, by that name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "METHOD"):
            found[module.METHOD] = module
    return dict(sorted(found.items()))

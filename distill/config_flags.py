"""A pydantic config as command-line flags, with `--config FILE.yaml` underneath: flags override the file."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from synth import safe_yaml
from synth.errors import ConfigError, describe_validation_error

_SIMPLE = (str, int, float, Path)


def _flag_kwargs(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords for a field's type, or None for types only a YAML file can set."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_kwargs(args[0]) if len(args) == 1 else None
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in _SIMPLE:
        return {"type": annotation}
    if origin is Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if origin is list and typing.get_args(annotation) and typing.get_args(annotation)[0] in _SIMPLE:
        return {"type": typing.get_args(annotation)[0], "nargs": "+"}
    return None


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], title: str = "settings") -> None:
    """`--config FILE` plus one flag per simple field of `model`; unset flags leave the file's value."""
    parser.add_argument("--config", type=Path, metavar="FILE.yaml", help="settings file; flags given here override it")
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        kwargs = _flag_kwargs(field.annotation)
        if kwargs is None:
            continue
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or "").rstrip(".")
        if default not in (None, [], {}) and not isinstance(default, BaseModel):
            help_text += f" (default: {default})"
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=help_text, **kwargs)


def load_config(args: argparse.Namespace, model: type[BaseModel]):
    """The config from `--config` (if given) with every flag given on the command line on top."""
    data: dict[str, Any] = {}
    source = "flags"
    if getattr(args, "config", None) is not None:
        path = Path(args.config)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = safe_yaml.load(path.read_text(encoding="utf-8"), path) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        data.update(loaded)
    given = vars(args)
    data.update({name: given[name] for name in model.model_fields if name in given})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc, 'key')}") from None

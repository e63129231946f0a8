"""A pydantic config as command-line flags, with `--config FILE.yaml` underneath: flags override the file."""

from __future__ import annotations

import argparse
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Collection, Literal

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from synth import safe_yaml
from synth.errors import ConfigError, describe_validation_error

_SIMPLE = (str, int, float, Path)


def checked_type(base: type, field: FieldInfo | None = None) -> Callable[[str], Any]:
    """An argparse `type` that converts like `base`, then checks the field's constraints as a file's key is checked.

    So `--concurrency 0` or `--temperature inf` stop at parsing, with argparse's one line
    naming the flag, before any work (and a recipe's stage is refused before the run).
    """
    metadata = list(field.metadata) if field is not None else []
    adapter = TypeAdapter(Annotated[(base, *metadata)]) if metadata else None

    def convert(text: str) -> Any:
        value = base(text)  # a ValueError here reads "invalid int value: 'x'", as argparse always said
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if adapter is not None:
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                raise argparse.ArgumentTypeError(f"{describe_validation_error(exc)} (got {text})") from None
        return value

    convert.__name__ = base.__name__
    return convert


def model_flag_type(model: type[BaseModel], name: str) -> Callable[[str], Any]:
    """The checked argparse `type` of one simple field of `model`, for flags written by hand."""
    field = model.model_fields[name]
    return checked_type(_simple_base(field.annotation), field)


def _simple_base(annotation: Any) -> Any:
    """`int` for `int | None`; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _flag_kwargs(annotation: Any, field: FieldInfo | None = None) -> dict[str, Any] | None:
    """argparse keywords for a field's type, or None for types only a YAML file can set."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_kwargs(args[0], field) if len(args) == 1 else None
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in _SIMPLE:
        return {"type": checked_type(annotation, field) if annotation in (int, float) else annotation}
    if origin is Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if origin is list and typing.get_args(annotation) and typing.get_args(annotation)[0] in _SIMPLE:
        item = typing.get_args(annotation)[0]
        return {"type": checked_type(item) if item in (int, float) else item, "nargs": "+"}
    return None


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], title: str = "settings", exclude: Collection[str] = ()) -> None:
    """`--config FILE` plus one flag per simple field of `model` not in `exclude`; unset flags leave the file's value."""
    parser.add_argument("--config", type=Path, metavar="FILE.yaml", help="settings file; flags given here override it")
    group = parser.add_argument_group(title)
    for name in flag_fields(model, exclude):
        field = model.model_fields[name]
        kwargs = _flag_kwargs(field.annotation, field)
        default = field.get_default(call_default_factory=True)
        help_text = (field.description or "").rstrip(".")
        if default not in (None, [], {}) and not isinstance(default, BaseModel):
            help_text += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        # argparse %-formats help: a literal "30 %" would print its whole parameter dict.
        help_text = help_text.replace("%", "%%")
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=help_text, **kwargs)


def flag_fields(model: type[BaseModel], exclude: Collection[str] = ()) -> list[str]:
    """The fields of `model` that `add_config_flags` makes a flag of: the simple ones not in `exclude`."""
    return [name for name, field in model.model_fields.items() if name not in exclude and _flag_kwargs(field.annotation, field) is not None]


def _is_list(annotation: Any) -> bool:
    """Whether a field holds a list and nothing else (`list[str]`, `list[str] | None`)."""
    return typing.get_origin(_simple_base(annotation)) is list


def load_config(args: argparse.Namespace, model: type[BaseModel], flags_only: Collection[str] = ()):
    """The config from `--config` (if given) with every flag given on the command line (or recipe stage) on top.

    Fields in `flags_only` (a command's own flags: --input, --output, ...) are unknown keys to the file.
    """
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
        if refused := [key for key in loaded if key in flags_only]:
            raise ConfigError("; ".join(f"{path}: key '{key}': unknown key" for key in refused))
        data.update(loaded)
    given = vars(args)
    flags = {name for name in model.model_fields if name in given}
    # A list flag given one value (a recipe's `teacher: SPEC`) is a list of one, as on a command line.
    data.update({name: [given[name]] if _is_list(model.model_fields[name].annotation) and not isinstance(given[name], list) else given[name] for name in flags})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, flags, source)) from None


def describe_errors(exc: ValidationError, flags: set[str], source: str = "flags") -> str:
    """Each error as `--flag-name: message` when a flag set the value, else `SOURCE: key 'name': message`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        if loc and loc[0] in flags:
            parts.append(f"--{loc[0].replace('_', '-')}: {msg}")
        else:
            parts.append(f"{source}: key '{'.'.join(loc)}': {msg}" if loc else f"{source}: {msg}")
    return "; ".join(parts)

"""`distill student derive`: a student made from a teacher by keeping some of its decoder layers."""

from __future__ import annotations

import argparse
import json

from pydantic import BaseModel, ConfigDict, ValidationError

from distill.commands.common import Runnable
from distill.config_flags import describe_errors
from synth.errors import ConfigError


def register(sub) -> None:
    """Add the `student` command group."""
    p = sub.add_parser("student", help="make a student model", description="Make a student model to distill into.")
    ssub = p.add_subparsers(dest="student_command", required=True, metavar="COMMAND")
    derive = ssub.add_parser(
        "derive",
        help="keep a subset of a model's decoder layers (evenly spaced, first and last kept)",
        description="Copy a Llama-family model keeping only some of its decoder layers: evenly spaced, the first and "
        "last always kept, weights copied unchanged. The result loads with AutoModelForCausalLM and is meant to be "
        "trained next (distill train sft|kd --model DIR): a shallower copy starts far worse than its source.",
    )
    derive.add_argument("--from", dest="source", default="embedded", metavar="DIR",
                        help="source model: 'embedded' (SmolLM2-135M-Instruct, default) or a Hugging Face model directory")
    derive.add_argument("--keep", required=True, type=keep_value, metavar="K",
                        help="a fraction of the layers (0.5 keeps half; 1.0 all) or a number of layers (an integer, e.g. 8)")
    derive.add_argument("--out", required=True, metavar="DIR", help="where the student goes (must be empty or absent)")
    derive.add_argument("--overwrite", action="store_true", help="replace an earlier student in --out (a folder this command wrote; never other files)")
    derive.set_defaults(func=run_derive)


def keep_value(text: str) -> float | int:
    """'0.5' → 0.5 (a fraction), '8' → 8 (a count)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (0.5) nor a layer count (8)") from None


class DeriveSettings(BaseModel):
    """Settings of `distill student derive`: the source model, what to keep and where the student goes."""

    model_config = ConfigDict(extra="forbid")

    source: str = "embedded"
    keep: int | float
    out: str
    overwrite: bool = False


def run_derive(args: argparse.Namespace) -> int:
    """Derive the student and say what was kept."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> DeriveSettings:
    """The settings from flag values (a parsed command line, or a recipe stage's keys: `from` is `--from`)."""
    own = {"source": values["from"]} if "from" in values else {}
    own.update({k: values[k] for k in DeriveSettings.model_fields if k in values})
    if isinstance(own.get("keep"), str):
        try:
            own["keep"] = keep_value(own["keep"])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--keep: {exc}") from None
    try:
        return DeriveSettings(**own)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, set(own))) from None


def execute(settings: DeriveSettings) -> int:
    """Derive the student and say what was kept."""
    # Imported when it runs: deriving loads torch and transformers, which `distill --help` must not pay for.
    from trainers.student import DERIVED_FROM, derive_student

    out = derive_student(settings.source, settings.keep, settings.out, overwrite=settings.overwrite)
    info = json.loads((out / DERIVED_FROM).read_text(encoding="utf-8"))
    kept = info["kept_layers"]
    print(f"student: {out} ({len(kept)} of {info['source_layers']} layers of {info['source']})")
    print(f"kept layers: {', '.join(map(str, kept))}")
    return 0


#: `distill student derive` as a recipe stage.
RUNNABLE = {"student derive": Runnable(frozenset({"from", "source", "keep", "out", "overwrite"}), settings_from, execute)}

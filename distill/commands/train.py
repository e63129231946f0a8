"""`distill train METHOD`: one trainer per method, configured by --config FILE.yaml and flags."""

from __future__ import annotations

import argparse

from distill.commands.common import Runnable, config_keys
from distill.config_flags import add_config_flags, load_config
from trainers import METHODS, train
from trainers.settings import TrainSettings, require_data


def register(sub) -> None:
    """Add `train` with one subcommand per method in trainers.METHODS (no trainer is imported until one runs)."""
    p = sub.add_parser("train", help="distill a student with TRL", description="Train a student on records written by a synth command.")
    msub = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, method in METHODS.items():
        mp = msub.add_parser(name, help=method.summary, description=method.summary + " Flags override the --config file.")
        add_config_flags(mp, method.settings, f"{name} settings")
        mp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and say where the model, metrics and plot went."""
    return execute(settings_from(vars(args)))


def settings_from(values: dict) -> TrainSettings:
    """The settings of method `values['method']` from flag values (a parsed command line, or a recipe stage's keys).

    Refuses settings without data here, so a recipe stage missing it fails before any stage runs.
    """
    settings = load_config(argparse.Namespace(**values), METHODS[values["method"]].settings)
    require_data(settings)
    return settings


def execute(settings: TrainSettings) -> int:
    """Train the method these settings configure, and say where the model, metrics and plot went."""
    method = next(name for name, m in METHODS.items() if type(settings) is m.settings)
    result = train(method, settings)
    print(f"model: {result.output_dir}")
    print(f"metrics: {result.output_dir / 'metrics.json'}  curves: {result.output_dir / 'training_curves.png'}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key}: {value:.4g}")
    return 0


#: `distill train METHOD` as recipe stages, one per method.
RUNNABLE = {
    f"train {name}": Runnable(config_keys(method.settings), lambda values, name=name: settings_from({**values, "method": name}), execute)
    for name, method in METHODS.items()
}

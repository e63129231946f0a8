"""`distill train METHOD`: one trainer per method, configured by --config FILE.yaml and flags."""

from __future__ import annotations

import argparse

from distill.config_flags import add_config_flags, load_config


def register(sub) -> None:
    """Add `train` with one subcommand per trainer module."""
    from trainers import methods

    p = sub.add_parser("train", help="distill a student with TRL", description="Train a student on records written by a synth command.")
    msub = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, module in methods().items():
        doc = (module.__doc__ or name).strip().splitlines()[0]
        mp = msub.add_parser(name, help=doc, description=doc + " Flags override the --config file.")
        add_config_flags(mp, module.CONFIG, f"{name} settings")
        mp.set_defaults(func=run, module=module)


def run(args: argparse.Namespace) -> int:
    """Train and say where the model, metrics and plot went."""
    from trainers.common import preflight

    config = load_config(args, args.module.CONFIG)
    preflight(config)
    result = args.module.train(config)
    print(f"model: {result.output_dir}")
    print(f"metrics: {result.output_dir / 'metrics.json'}  curves: {result.output_dir / 'training_curves.png'}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key}: {value:.4g}")
    return 0

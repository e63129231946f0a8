"""One module per `distill` subcommand; each exposes `register(subparsers)`."""

"""One module per ``fastdiff`` subcommand, each with ``register(subparsers)``."""

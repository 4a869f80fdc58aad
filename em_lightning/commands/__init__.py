"""The top layer: one module per ``em-fit`` subcommand, each with ``main(argv)``."""

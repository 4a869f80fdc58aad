"""The top layer: one module per ``em-fit`` subcommand, each with ``main(argv)``."""

import argparse


def help_parser(prog: str, doc: str | None, first_paragraph: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the command's docstring as a terminal shows it: reST's
    double backquotes dropped, line breaks and example blocks kept."""
    text = (doc or "").strip()
    if first_paragraph:
        text = text.split("\n\n")[0]
    return argparse.ArgumentParser(prog=prog, description=text.replace("``", ""),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

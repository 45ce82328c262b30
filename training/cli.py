"""The `freesolo` console script: one parser, subcommands contributed by each package.

Packages register through the ``freesolo.commands`` entry-point group (see pyproject.toml), so the dispatcher
lives in ``training`` without importing ``export`` or ``serving``, which build on it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from training.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """Collect every registered subcommand into one parser."""
    parser = argparse.ArgumentParser(
        prog="freesolo",
        description="Annotation-free instance segmentation (FreeSOLO / SOLOv2): train, evaluate, export, serve.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group="freesolo.commands"), key=lambda e: e.name):
        entry.load()(commands)
    return parser


def one_line(error: UserError) -> str:
    """The user-facing message; a DataLoader worker re-raises it with the worker's traceback embedded."""
    text = str(error)
    marker = f"{UserError.__name__}: "
    if "Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors become one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as error:
        print(f"freesolo {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"freesolo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

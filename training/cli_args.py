"""Argument helpers every package's subcommands share: the subparsers type, --preset/--set, positive integers."""

from __future__ import annotations

import argparse
from typing import Any

from training.config import Config, apply_overrides, available_presets, load_preset

Subcommands = Any  # what ``add_subparsers`` returns: argparse's _SubParsersAction is private


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and --set, shared by every command that builds a config."""
    parser.add_argument("--preset", default="tiny", choices=available_presets(), help="config preset (default tiny)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set weak.pairwise_weight=0 (repeatable; see config.yaml of a run)",
    )


def config_from_arguments(args: argparse.Namespace) -> Config:
    return apply_overrides(load_preset(args.preset), args.set)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value

"""The benchmarks package's subcommand: ``freesolo bench``."""

from __future__ import annotations

import argparse

from training.cli_args import Subcommands


def register(commands: Subcommands) -> None:
    """Add ``bench`` to the ``freesolo`` parser."""
    from benchmarks import run

    bench = commands.add_parser(
        "bench",
        help="latency, throughput, load, NMS and fault benchmarks, with one report",
        description=run.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_arguments(bench)
    bench.set_defaults(handler=lambda args: run.run_benchmarks(args.out, args.parts, args.quick))

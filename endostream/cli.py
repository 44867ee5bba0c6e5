"""`endostream` command line: data, train, eval, ablate, demo, export, bench, gpu-check, serve.

One module per command in endostream/commands/; each imports its package lazily, so building the parser needs
neither torch nor training/ (`endostream serve` runs in images without them) and `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from endostream.commands import ablate, bench, data, demo, export, gpu_check, serve, temporal, train
from endostream.commands import eval as evaluate

# the top-level commands, in the order `endostream --help` lists them
COMMANDS = (data, train, evaluate, ablate, demo, export, bench, gpu_check, serve, temporal)


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _version() -> str:
    from endostream import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endostream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"endostream {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        # User errors: one clear line, no traceback (run with -v for the traceback).
        if args.verbose:
            raise
        print(f"endostream {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

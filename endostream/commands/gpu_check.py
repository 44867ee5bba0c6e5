"""`endostream gpu-check`: the GPU path in one run (endostream/gpu_check.py; `scripts/gpu-check` runs it directly)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from endostream.gpu_check import add_arguments

    check = sub.add_parser(
        "gpu-check",
        help="the GPU path in one run: bundles, pytest -m gpu, bench engine/http/ws, summary.md (--cpu: small, no GPU)",
    )
    add_arguments(check)
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from endostream.gpu_check import run_from_args

    return run_from_args(args)

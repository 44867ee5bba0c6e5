"""`endostream ablate`: the Table V-style ablation, one run folder per row (training/ablation.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ab = sub.add_parser(
        "ablate", help="Table V-style ablation: backbone only / +TESLA / +SMA / all, single-task rows, Δm, seeds"
    )
    ab.add_argument("--config", default="tiny", help="config shared by every row (default: tiny)")
    ab.add_argument("--data", type=Path, required=True, help="dataset folder")
    ab.add_argument("--out", type=Path, default=Path("runs/ablation"), help="one run folder per row goes here")
    ab.add_argument("--split", default="test", help="split the rows are scored on (default: test)")
    ab.add_argument("--seeds", type=int, default=1, help="runs per row (train.seed, +1, ...); mean ± std reported")
    ab.add_argument(
        "--rows",
        help="comma-separated rows to run, by folder name: backbone_only, tesla, sma, all_endoarss, "
        "single_task_<task> (default: all)",
    )
    ab.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    ab.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every row, e.g. train.epochs=5")
    ab.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.jobs.ablation import run_ablation

    run_ablation(
        args.config,
        args.data,
        args.out,
        overrides=list(args.overrides),
        split=args.split,
        progress=not args.no_progress,
        seeds=args.seeds,
        rows=[r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None,
    )
    return 0

"""`endostream train`: train a model from a shipped config or a .yaml, with key=value overrides."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser("train", help="train a model from a config")
    train.add_argument("--config", required=True, help="shipped config name (tiny, endoarss_vits14, ...) or a .yaml")
    train.add_argument("--data", type=Path, help="dataset folder (overrides data.root)")
    train.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from RUN/last if present")
    train.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.engine.run import train

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    cfg = load_config(args.config, overrides)
    out = args.out or Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        logger.info("%s", result.summary())
    return 0

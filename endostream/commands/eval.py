"""`endostream eval`: score a checkpoint on a dataset split, or (`--corruptions`) its robustness to corruptions."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split")
    ev.add_argument("checkpoint", type=Path, help="checkpoint directory (RUN/best or RUN/best-merged)")
    ev.add_argument("--data", type=Path, required=True, help="dataset folder")
    ev.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ev.add_argument("--json", type=Path, help="write the result JSON here")
    ev.add_argument("--markdown", type=Path, help="write a markdown table here")
    ev.add_argument("--baseline", type=Path, help="result JSON to compute Δm against")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, help="score only this many evenly spaced frames of the split")
    ev.add_argument(
        "--corruptions",
        help="robustness: all, a family (noise, blur, weather, digital) or comma-separated ImageNet-C names; "
        "scores every corrupted version of the split instead of the plain evaluation",
    )
    ev.add_argument("--severities", default="1-5", help="robustness severities, e.g. 1-5 or 1,3,5 (default 1-5)")
    ev.add_argument("--seed", type=int, default=0, help="robustness: base seed of the corruptions (default 0)")
    ev.add_argument(
        "--out", type=Path, help="robustness: folder for robustness.{json,md,png} (default: RUN/robustness_SPLIT)"
    )
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.corruptions is not None:
        return run_robustness(args)
    from training.eval.evaluate import run_evaluation

    run_evaluation(
        args.checkpoint,
        args.data,
        split=args.split,
        json_out=args.json,
        markdown_out=args.markdown,
        baseline=args.baseline,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    return 0


def run_robustness(args: argparse.Namespace) -> int:
    from training.eval.corruptions import parse_corruptions, parse_severities
    from training.eval.robustness import run_robustness

    run_robustness(
        args.checkpoint,
        args.data,
        args.out or args.checkpoint.parent / f"robustness_{args.split}",
        split=args.split,
        corruptions=parse_corruptions(args.corruptions),
        severities=parse_severities(args.severities),
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    return 0

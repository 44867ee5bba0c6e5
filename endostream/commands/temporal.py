"""`endostream train-temporal`: a causal temporal activity head (and its baselines) on generated clips, evaluated.

Training side in training/temporal/pipeline.py; here the CLI, the ONNX export of every head (each is checked step by
step against PyTorch) and the step latency at batch 1, which go into `eval.json` beside the metrics. Bundle a head
with `endostream export onnx CKPT --out BUNDLE --temporal-head RUN/tcn`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
TCN_FLAGS = ("epochs", "layers", "stages", "members", "flicker_ratio")  # TCNConfig fields settable from the CLI


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `train-temporal` on the top-level subparsers (imports nothing heavy: the CLI builds fast)."""
    p = sub.add_parser(
        "train-temporal",
        help="causal temporal activity head (TCN) + EMA/HMM baselines on generated clips, with evaluation",
    )
    p.add_argument("checkpoint", type=Path, help="frozen multi-task checkpoint (RUN/best-merged or RUN/best)")
    p.add_argument("--out", type=Path, required=True, help="run folder for the heads, eval.json, eval.md, plot")
    p.add_argument("--task", help="classification task to follow (default: the checkpoint's only one)")
    # None = the dataclass default (training/temporal: ClipSetSpec, TCNConfig), so defaults live in one place.
    p.add_argument("--clips", type=int, help="generated clips, split 70/15/15 by clip (default 160)")
    p.add_argument("--seconds", type=float, help="clip length in s (default 40)")
    p.add_argument("--frame-interval", type=float, help="head time step in s, 1/n (default 0.5)")
    p.add_argument("--render-size", type=int, help="clip render size before resizing to the model's (default 128)")
    p.add_argument("--seed", type=int, help="clip seed (default 7)")
    p.add_argument("--epochs", type=int, help="TCN epochs (default 40)")
    p.add_argument("--layers", type=int, help="TCN dilated layers per stage, 2 (2^layers - 1) steps each (default 4)")
    p.add_argument("--stages", type=int, help="TCN stages: features, then probability refinement (default 2)")
    p.add_argument("--members", type=int, help="TCN copies trained side by side and averaged (default 3)")
    p.add_argument(
        "--flicker-ratio",
        type=float,
        help="hysteresis rule: validation spurious switches at most this x the per-frame model's (default 0.15)",
    )
    p.add_argument("--cache-dir", type=Path, help="feature cache root (default ~/.cache/endostream/temporal_features)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the head graphs (default 18)")
    p.set_defaults(func=run_train_temporal)


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """Dataclass keyword -> value of the CLI flag `names[keyword]`, for the flags that were given."""
    return {key: getattr(args, flag) for key, flag in names.items() if getattr(args, flag) is not None}


def run_train_temporal(args: argparse.Namespace) -> int:
    from training.temporal.clips import ClipSetSpec
    from training.temporal.train import TCNConfig

    spec = ClipSetSpec(
        **_given(
            args,
            seed="seed",
            clips="clips",
            seconds="seconds",
            frame_interval_s="frame_interval",
            render_size="render_size",
        )
    )
    report = train_and_report(
        args.checkpoint,
        args.out,
        spec=spec,
        tcn=TCNConfig(**_given(args, **{name: name for name in TCN_FLAGS})),
        task=args.task,
        cache_dir=args.cache_dir,
        opset=args.opset,
    )
    # The table is the command's result: stdout, like the other commands' summaries.
    sys.stdout.write((args.out / EVAL_MD).read_text())
    sys.stdout.write(f"{args.out}: heads tcn/ ema/ hmm/, {EVAL_JSON}, {EVAL_MD}, {report['plot']}\n")
    return 0


def train_and_report(
    checkpoint: Path,
    out: Path,
    *,
    spec: Any = None,
    tcn: Any = None,
    task: str | None = None,
    cache_dir: Path | None = None,
    opset: int = 18,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate (training/temporal/pipeline.py), export each head's step graph, measure its latency."""
    from export.temporal import HEAD_FILE, export_head, step_latency
    from training.temporal.evaluate import markdown_table
    from training.temporal.pipeline import train_temporal

    out = Path(out)
    heads, report = train_temporal(
        checkpoint, out, spec=spec, tcn=tcn, task=task, cache_dir=cache_dir, progress=progress
    )
    report["latency_ms"], report["step_parity_max_abs_diff"] = {}, {}
    for name, head in heads.items():
        exported = export_head(head, out / name / HEAD_FILE, opset)
        report["step_parity_max_abs_diff"][name] = exported.parity_max_abs_diff
        report["latency_ms"][name] = step_latency(exported.path)
    report["receptive_field_frames"] = {name: head.receptive_field_frames for name, head in heads.items()}
    (out / EVAL_JSON).write_text(json.dumps(report, indent=1) + "\n")
    (out / EVAL_MD).write_text(markdown_table(report))
    return report


def demo_temporal(workdir: Path) -> Path:
    """The demo's temporal step: train and evaluate the heads on the demo checkpoint unless done; the TCN's folder.

    Writes `workdir/temporal/` (heads, eval.json, eval.md, timeline.png) with its feature cache in
    `workdir/temporal-cache/`; a finished run (eval.json present) is kept.
    """
    out = Path(workdir) / "temporal"
    if not (out / EVAL_JSON).is_file():
        checkpoint = Path(workdir) / "runs" / "tiny" / "best-merged"
        train_and_report(checkpoint, out, cache_dir=Path(workdir) / "temporal-cache")
        logger.info("temporal heads: %s (table in %s)", out, out / EVAL_MD)
    return out / "tcn"

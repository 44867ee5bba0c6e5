"""`endostream data synth`: render a synthetic endoscopy dataset (training/data/writer.py does the work).

The arguments are declared here rather than imported from the writer: importing any training module imports torch
(training/__init__.py), and the parser is built for every command, `endostream serve` included.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = sub.add_parser("data", help="generate or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="render a synthetic endoscopy dataset (EndoARSS layout)")
    add_synth_arguments(synth)
    synth.set_defaults(func=run_synth)


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    parser.add_argument("--images", type=int, default=4000, help="still frames (default: 4000)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives identical files")
    parser.add_argument("--video", type=int, default=0, metavar="K", help="also render K MP4 clips")
    parser.add_argument("--height", type=int, default=256, help="still frame height (default: 256)")
    parser.add_argument("--width", type=int, default=256, help="still frame width (default: 256)")
    parser.add_argument("--splits", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--video-seconds", type=float, default=6.0, help="clip length (default: 6)")
    parser.add_argument("--fps", type=int, default=30, help="clip frame rate (default: 30)")
    parser.add_argument("--video-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes rendering images (default: all cores; same files for any)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previously generated dataset in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_synth(args: argparse.Namespace) -> int:
    from training.data.writer import run_synth as write_dataset

    write_dataset(args)
    return 0

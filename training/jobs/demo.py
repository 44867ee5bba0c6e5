"""The main job on the embedded default: generate data and clips if missing, train the tiny config, evaluate on test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from training.checkpoint import WEIGHTS_FILE
from training.config import load_config
from training.data.writer import synthesize_dataset, write_clips
from training.engine.run import train
from training.engine.trainer import epochs_recorded
from training.eval.evaluate import run_evaluation

logger = logging.getLogger(__name__)

DEMO_CLIPS = 2


def run_demo(workdir: Path, *, images: int = 4000, seed: int = 0) -> dict:
    """Data -> tiny model -> evaluation under `workdir`; each step is skipped when its output exists."""
    data = workdir / "data"
    if not (data / "labels.json").is_file():
        logger.info("generating %d synthetic endoscopy frames into %s", images, data)
        synthesize_dataset(data, images=images, seed=seed, workers=os.cpu_count() or 1)
    videos = data / "videos"
    if not any(videos.glob("clip_*.mp4")):  # live-source material for the service's stream demo
        write_clips(videos, DEMO_CLIPS, seed, seconds=20.0, fps=30, workers=os.cpu_count() or 1)
        logger.info("wrote %d clips (20 s, 30 fps) into %s", DEMO_CLIPS, videos)
    run = workdir / "runs" / "tiny"
    cfg = load_config("tiny", [f"data.root={data}"])
    if not _finished(run, cfg.train.epochs):  # an interrupted run resumes from RUN/last instead of being kept
        train(cfg, run, resume=True)
    result = run_evaluation(
        run / "best-merged", data, split="test", json_out=workdir / "eval_test.json", markdown_out=workdir / "eval.md"
    )
    logger.info("results: %s and %s", workdir / "eval_test.json", workdir / "eval.md")
    return result


def _finished(run: Path, epochs: int) -> bool:
    """Whether `run` trained every epoch (one line per epoch in metrics.jsonl) and wrote its merged checkpoint."""
    return epochs_recorded(run) >= epochs and (run / "best-merged" / WEIGHTS_FILE).is_file()

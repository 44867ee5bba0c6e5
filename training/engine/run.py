"""`train`: one training run of a config into a run folder, with the Trainer its config asks for."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from training.config import ExperimentConfig
from training.engine.distributed import init_distributed
from training.engine.stage1 import Stage1Trainer
from training.engine.supervised import TaskTrainer
from training.engine.trainer import Trainer, TrainResult, seed_everything


def train(
    cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, device: str | None = None, progress: bool = True
) -> TrainResult:
    """Train `cfg` into `run_dir` (single process, or one rank of a torchrun job).

    SAK stage 1 (`model.sak.stage: 1`) distils on unlabeled frames (`Stage1Trainer`); everything else trains its
    tasks (`TaskTrainer`). The result's `seconds` cover the whole run, model building (and SAK's teacher pass) included.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    started = time.perf_counter()
    ctx = init_distributed(device)
    seed_everything(cfg.train.seed)
    kind: type[Trainer] = Stage1Trainer if cfg.model.family == "sak" and cfg.model.sak.stage == 1 else TaskTrainer
    trainer = kind(cfg, run_dir, ctx, progress=progress)  # builds the model: SAK's teacher pass runs here
    if resume:
        trainer.resume()
    result = trainer.fit()
    return replace(result, seconds=time.perf_counter() - started)

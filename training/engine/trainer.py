"""The Trainer: the epoch loop and the only owner of a run folder's bookkeeping.

Run folder layout:
    RUN/config.yaml         resolved config
    RUN/metrics.jsonl       one line per epoch (train losses, validation metrics, time)
    RUN/last/               unmerged checkpoint + trainer_state.pt (resume point)
    RUN/best/               unmerged checkpoint of the best validation epoch
    RUN/best-merged/        the same with every adapter folded into per-task weights (runs with tasks only)

What a kind of run trains is a subclass: `supervised.TaskTrainer` (tasks on labelled frames) and
`stage1.Stage1Trainer` (SAK's distillation on unlabeled frames). A subclass builds its model, data and parameters,
then calls `setup_optimization`; it implements `train_epoch`, `validate` and `describe`, and may add state.
Model selection uses the validation split only (the public EndoARSS code picks epochs on the test set; we do not).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from training.checkpoint import WEIGHTS_FILE, save_checkpoint
from training.config import ExperimentConfig, write_config
from training.engine.distributed import DistributedContext, barrier, shutdown

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    best_metrics: dict[str, Any]
    epochs_run: int
    seconds: float  # wall time of the run, model building (and SAK's teacher pass) included
    checkpoint: Path  # the folder to use next: RUN/best-merged (to eval/export), RUN/best after SAK stage 1

    def summary(self) -> str:
        """One line for people: the best epoch's scores and the checkpoint to use next."""
        if "rep_sim" in self.best_metrics:  # SAK stage 1: distillation only, no task scores
            scores = f"held-out Rep Sim {self.best_metrics['rep_sim']['mean']:.3f}"
        else:
            accuracy = self.best_metrics.get("activity", {}).get("accuracy", float("nan"))
            miou = self.best_metrics.get("segmentation", {}).get("miou", float("nan"))
            scores = f"val acc {accuracy:.3f}, mIoU {miou:.3f}"
        return f"done in {self.seconds / 60:.1f} min: best epoch {self.best_epoch} ({scores}) -> {self.checkpoint}"


def epochs_recorded(run_dir: Path) -> int:
    """How many epochs `run_dir` has finished (lines of its metrics.jsonl; 0 when there is none)."""
    metrics = run_dir / METRICS_FILE
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: ExperimentConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    optim = cfg.optim
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    raise ValueError(f"optim.optimizer {optim.optimizer!r} is not supported; choose 'adam' or 'adamw'")


def build_scheduler(
    cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warm-up, then cosine / step decay / constant."""
    optim = cfg.optim
    warmup = optim.warmup_epochs * steps_per_epoch
    total = max(1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if optim.scheduler == "step":
            return optim.gamma ** ((step // steps_per_epoch) // max(1, optim.step_size))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer(ABC):
    """Epoch loop, time limit, metrics.jsonl, last/best(-merged) checkpoints and the resume state of one run.

    Subclasses set `model` and `labels`, call `make_loader` and then `setup_optimization` in their `__init__`.
    """

    merged_best: bool = True  # also write RUN/best-merged (what eval and export read)
    next_checkpoint: str = "best-merged"  # the folder the run's result points at
    stage_name: str = "epoch"  # progress bar and log prefix

    model: nn.Module
    labels: dict[str, Any]
    params: list[nn.Parameter]
    loader: DataLoader
    sampler: DistributedSampler | None = None

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, ctx: DistributedContext, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.progress = progress and ctx.is_main
        self.start_epoch = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, Any] = {}

    def make_loader(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any]) -> None:
        """The training loader over `dataset` (seeded shuffle; a distributed sampler under torchrun)."""
        cfg, ctx = self.cfg, self.ctx
        self.sampler = (
            DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.train.seed)
            if ctx.enabled
            else None
        )
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_fn,
            drop_last=len(dataset) >= cfg.train.batch_size * ctx.world_size,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )

    def setup_optimization(self, params: list[nn.Parameter]) -> None:
        """Optimiser and per-step scheduler over `params`, sized by `self.loader`."""
        self.params = params
        self.optimizer = build_optimizer(self.cfg, params)
        self.scheduler = build_scheduler(self.cfg, self.optimizer, max(1, len(self.loader)))

    # ---------------------------------------------------------------- what a subclass provides
    @abstractmethod
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; returns the mean of each logged loss term."""

    @abstractmethod
    def validate(self) -> tuple[dict[str, Any], float]:
        """(validation metrics, selection score: higher is better)."""

    def describe(self) -> str:
        """One log line at the start of `fit`: what is trained on what."""
        return f"training {self.cfg.name}"

    def epoch_summary(self, metrics: dict[str, Any]) -> str:
        """The validation part of the per-epoch log line."""
        return f"val score {metrics}"

    def extra_state(self) -> dict[str, Any]:
        """State a subclass adds to trainer_state.pt (e.g. the loss weighting)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook, empty by default
        """Restore what `extra_state` saved."""

    # ---------------------------------------------------------------- state
    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "torch_rng": torch.get_rng_state(),
            **self.extra_state(),
        }

    def resume(self) -> bool:
        """Continue from RUN/last if it exists; returns whether anything was restored."""
        last = self.run_dir / "last"
        state_path = last / STATE_FILE
        if not state_path.is_file():
            return False
        self.model.load_state_dict(load_file(str(last / WEIGHTS_FILE), device=str(self.ctx.device)))
        state = torch.load(state_path, map_location=self.ctx.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "best" in state:  # written by SAK stage 1 before it ran on this Trainer
            best = state["best"]
            state = {**state, "best_score": best["score"], "best_epoch": best["epoch"], "best_metrics": best["metrics"]}
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self.load_extra_state(state)
        self.start_epoch = state["epoch"] + 1
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_metrics = state["best_metrics"]
        logger.info("resumed from %s at epoch %d", last, self.start_epoch)
        return True

    # ---------------------------------------------------------------- loop
    def progress_bar(self, epoch: int) -> tqdm:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return tqdm(
            self.loader,
            desc=f"{self.stage_name} {epoch + 1}/{self.cfg.train.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )

    def step_optimizer(self) -> None:
        """Clip the gradients (optim.grad_clip), then step the optimiser and the scheduler."""
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        started = time.perf_counter()
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.run_dir / CONFIG_FILE)
            logger.info(self.describe())
        epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, cfg.train.epochs):
            epoch_start = time.perf_counter()
            train_stats = self.train_epoch(epoch)
            if ctx.is_main:
                self._end_of_epoch(epoch, train_stats, time.perf_counter() - epoch_start)
            barrier(ctx)
            elapsed_min = (time.perf_counter() - started) / 60
            if cfg.train.time_limit_minutes is not None and elapsed_min >= cfg.train.time_limit_minutes:
                logger.warning("time limit of %.1f min reached after epoch %d", cfg.train.time_limit_minutes, epoch + 1)
                break
        seconds = time.perf_counter() - started
        shutdown(ctx)
        return TrainResult(
            self.run_dir,
            self.best_epoch,
            self.best_score,
            self.best_metrics,
            epoch + 1,
            seconds,
            self.run_dir / self.next_checkpoint,
        )

    def _end_of_epoch(self, epoch: int, train_stats: dict[str, float], seconds: float) -> None:
        metrics, score = self.validate()
        record = {
            "epoch": epoch + 1,
            **train_stats,
            "val": metrics,
            "val_score": score,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 2),
        }
        with (self.run_dir / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        meta = {"epoch": epoch + 1, "val": metrics}
        last = save_checkpoint(self.model, self.cfg, self.labels, self.run_dir / "last", meta=meta)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.best_metrics = score, epoch + 1, metrics
            save_checkpoint(self.model, self.cfg, self.labels, self.run_dir / "best", meta=meta)
            if self.merged_best:
                save_checkpoint(self.model, self.cfg, self.labels, self.run_dir / "best-merged", merged=True, meta=meta)
        torch.save(self.state_dict(epoch), last / STATE_FILE)
        logger.info(
            "%s %d: %s | %s%s (%.0fs)",
            self.stage_name,
            epoch + 1,
            " ".join(f"{k}={v:.3f}" for k, v in train_stats.items()),
            self.epoch_summary(metrics),
            " *best*" if improved else "",
            seconds,
        )

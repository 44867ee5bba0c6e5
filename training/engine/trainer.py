"""Multi-task trainer: one batched forward for all tasks, pluggable loss weighting, best-on-validation checkpoints.

Run folder layout:
    RUN/config.yaml         resolved config
    RUN/metrics.jsonl       one line per epoch (train losses, validation metrics, time)
    RUN/last/               unmerged checkpoint + trainer_state.pt (resume point)
    RUN/best/               unmerged checkpoint of the best validation epoch
    RUN/best-merged/        the same with every adapter folded into per-task weights
Model selection uses the validation split only (the public EndoARSS code picks epochs on the test set; we do not).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from training.adapters.tuner import adapter_regularization
from training.builders.shared import build_model, count_parameters, resolved_backbone_overrides
from training.checkpoint import save_checkpoint
from training.config import ExperimentConfig, write_config
from training.data.datasets import open_dataset
from training.data.labels import read_labels
from training.data.transforms import TaskDataset, build_eval_transform, build_train_transform, collate
from training.engine.distributed import (
    DistributedContext,
    average_buffers,
    average_gradients,
    average_tensors,
    barrier,
    broadcast_module,
    init_distributed,
    shutdown,
)
from training.engine.weighting import EqualWeighting, build_weighting
from training.eval.evaluate import evaluate_model, selection_score
from training.models.endoarss import EndoARSS

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_tasks(labels: dict[str, Any], tasks: Sequence[str] | None) -> dict[str, Any]:
    """`labels` with only the named tasks (None: all), e.g. one task for a single-task baseline of Δm."""
    if tasks is None:
        return labels
    names = [t["name"] for t in labels["tasks"]]
    unknown = [task for task in tasks if task not in names]
    if unknown or not tasks:
        raise ValueError(f"train.tasks={list(tasks)} must name tasks of the dataset {names} (or be null for all)")
    return {**labels, "tasks": [t for t in labels["tasks"] if t["name"] in tasks]}


def task_losses(model: EndoARSS, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Cross-entropy per task: activity on the frame label, segmentation per pixel (255 = ignore)."""
    losses = {}
    for task, logits in outputs.items():
        if model.task_kinds[task] == "segmentation":
            losses[task] = F.cross_entropy(logits, batch["mask"], ignore_index=255)
        else:
            losses[task] = F.cross_entropy(logits, batch["activity"])
    return losses


def auxiliary_losses(model: nn.Module, batch: dict[str, Any], outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Extra loss terms a family adds to every training step (`model.auxiliary_losses`; none by default)."""
    hook = getattr(model, "auxiliary_losses", None)
    return hook(batch, outputs) if callable(hook) else {}


def split_parameters(model: EndoARSS) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trainable shared parameters, all trainable parameters); shared = used by every task's loss."""
    task_names = {name for names in model.task_parameter_names().values() for name in names}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in trainable if n not in task_names], [p for _, p in trainable]


def build_optimizer(cfg: ExperimentConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    optim = cfg.optim
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    raise ValueError(f"optim.optimizer {optim.optimizer!r} is not supported; choose 'adam' or 'adamw'")


def build_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
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


def autocast_context(cfg: ExperimentConfig, device: torch.device):
    """bf16 autocast on CUDA (mode auto or bf16); plain fp32 on CPU, where autocast only slows small models."""
    mode = cfg.train.amp
    enabled = device.type == "cuda" and mode in ("auto", "bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class Trainer:
    """Owns model, data, optimiser and loss weighting for one run."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, ctx: DistributedContext, progress: bool = True) -> None:
        if cfg.data.root is None:
            raise ValueError("data.root is not set: pass --data DIR (a folder made by `endostream data synth`)")
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.progress = progress and ctx.is_main
        root = Path(cfg.data.root)
        self.labels = select_tasks(read_labels(root).to_dict(), cfg.train.tasks)
        size = tuple(cfg.model.image_size)
        train_source = open_dataset(cfg.data, cfg.data.train_split)
        self.train_set = TaskDataset(
            train_source,
            build_train_transform(
                size,
                hflip=cfg.data.hflip,
                scale=tuple(cfg.data.scale),
                color_jitter=cfg.data.color_jitter,
                blur_prob=cfg.data.blur_prob,
            ),
            seed=cfg.train.seed,
        )
        self.val_set = TaskDataset(open_dataset(cfg.data, cfg.data.val_split), build_eval_transform(size), seed=0)
        self.sampler = (
            DistributedSampler(self.train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.train.seed)
            if ctx.enabled
            else None
        )
        generator = torch.Generator().manual_seed(cfg.train.seed)
        self.loader = DataLoader(
            self.train_set,
            batch_size=cfg.train.batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            drop_last=len(self.train_set) >= cfg.train.batch_size * ctx.world_size,
            generator=generator,
        )
        self.model = build_model(cfg.model, self.labels["tasks"]).to(ctx.device)
        if cfg.model.backbone.checkpoint is not None:
            # Saved checkpoints must rebuild this architecture without the backbone file.
            cfg.model.backbone.overrides = resolved_backbone_overrides(self.model.backbone)
        broadcast_module(self.model, ctx)
        # Family hook before the first epoch, e.g. SAK's teachers fill their feature cache in one pass over the data.
        prepare = getattr(self.model, "prepare_training", None)
        if callable(prepare):
            prepare(self.train_set, batch_size=cfg.train.batch_size, progress=self.progress)
        self.shared_params, self.params = split_parameters(self.model)
        self.optimizer = build_optimizer(cfg, self.params)
        self.scheduler = build_scheduler(cfg, self.optimizer, max(1, len(self.loader)))
        self.weighting = build_weighting(
            cfg.train.weighting,
            self.model.tasks,
            beta=cfg.train.dbmtl_beta,
            mu=cfg.train.stch_mu,
            warmup_epochs=cfg.train.stch_warmup_epochs,
            task_weights=cfg.train.task_weights,
            grad_sync=(lambda grads: average_tensors(grads, ctx)) if ctx.enabled else None,
        )
        self.start_epoch = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, Any] = {}

    # ---------------------------------------------------------------- state
    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "torch_rng": torch.get_rng_state(),
        }

    def resume(self) -> bool:
        """Continue from RUN/last if it exists; returns whether anything was restored."""
        last = self.run_dir / "last"
        state_path = last / STATE_FILE
        if not state_path.is_file():
            return False
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(last / "model.safetensors"), device=str(self.ctx.device)))
        state = torch.load(state_path, map_location=self.ctx.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = state["epoch"] + 1
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_metrics = state["best_metrics"]
        logger.info("resumed from %s at epoch %d", last, self.start_epoch)
        return True

    # ---------------------------------------------------------------- loop
    def _progress_bar(self, epoch: int) -> tqdm:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        return tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        totals: dict[str, float] = {}
        steps, regularization_total = 0, None
        bar = self._progress_bar(epoch)
        for batch in bar:
            batch = {k: v.to(self.ctx.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            with autocast_context(self.cfg, self.ctx.device):
                outputs = self.model(batch["image"])
            losses = task_losses(self.model, {k: v.float() for k, v in outputs.items()}, batch)
            auxiliary = auxiliary_losses(self.model, batch, outputs)
            self.optimizer.zero_grad(set_to_none=True)
            weighted = losses
            if auxiliary:  # e.g. SAK's gamma * distillation: added to the gradients as is, outside the task weighting
                extra = torch.stack([v.float() for v in auxiliary.values()]).sum()
                if isinstance(self.weighting, EqualWeighting):  # a plain sum: one backward pass serves both
                    first = next(iter(losses))
                    weighted = {**losses, first: losses[first] + extra}
                else:
                    extra.backward(retain_graph=True)
            self.weighting.backward(weighted, self.shared_params, epoch)
            average_gradients(self.params, self.ctx)
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
            # lambda * TA-LoRA's orthogonal regulariser (paper eq. 6), once per step, outside the task weighting and
            # after the clip: from N(0,1) factors its gradient is about half the task gradients' (orth_penalty=norm)
            # or hundreds of times them (squared), and clipping the sum would scale the task gradients of the whole
            # model down with it. Every rank computes the same term from the same weights, so it needs no averaging.
            # A constant zero without TA-LoRA.
            regularization = adapter_regularization(self.model)
            if regularization.requires_grad:
                regularization.backward()
                regularization_total = (regularization_total or 0.0) + float(regularization.detach())
            self.optimizer.step()
            self.scheduler.step()
            for task, loss in {**losses, **auxiliary}.items():
                totals[task] = totals.get(task, 0.0) + float(loss.detach())
            steps += 1
            bar.set_postfix(loss=f"{sum(float(v.detach()) for v in losses.values()):.3f}")
        self.weighting.end_epoch(epoch)
        average_buffers(self.model, self.ctx)
        stats = {f"loss.{task}": total / max(1, steps) for task, total in totals.items()}
        if regularization_total is not None:
            stats["regularization"] = regularization_total / max(1, steps)
        return stats

    def fit(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        started = time.perf_counter()
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.run_dir / "config.yaml")
            params = count_parameters(self.model)
            logger.info(
                "training %s: %d train / %d val images, %s parameters (%s trainable)",
                cfg.name,
                len(self.train_set),
                len(self.val_set),
                f"{params['total']:,}",
                f"{params['trainable']:,}",
            )
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
            self.run_dir / "best-merged",
        )

    def _end_of_epoch(self, epoch: int, train_stats: dict[str, float], seconds: float) -> None:
        metrics = evaluate_model(
            self.model, self.val_set, self.labels, batch_size=self.cfg.train.eval_batch_size, full=False
        )
        score = selection_score(metrics)
        record = {
            "epoch": epoch + 1,
            **train_stats,
            "val": metrics,
            "val_score": score,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(seconds, 2),
        }
        with (self.run_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        meta = {"epoch": epoch + 1, "val": metrics}
        last = save_checkpoint(self.model, self.cfg, self.labels, self.run_dir / "last", meta=meta)
        torch.save(self.state_dict(epoch), last / STATE_FILE)
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.best_metrics = score, epoch + 1, metrics
            save_checkpoint(self.model, self.cfg, self.labels, self.run_dir / "best", meta=meta)
            save_checkpoint(self.model, self.cfg, self.labels, self.run_dir / "best-merged", merged=True, meta=meta)
        logger.info(
            "epoch %d: %s | val acc %.3f mIoU %.3f%s (%.0fs)",
            epoch + 1,
            " ".join(f"{k}={v:.3f}" for k, v in train_stats.items()),
            metrics.get("activity", {}).get("accuracy", math.nan),
            metrics.get("segmentation", {}).get("miou", math.nan),
            " *best*" if improved else "",
            seconds,
        )


def train(
    cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, device: str | None = None, progress: bool = True
) -> TrainResult:
    """Train `cfg` into `run_dir` (single process, or one rank of a torchrun job)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.model.family == "sak" and cfg.model.sak.stage == 1:
        from training.builders.sak import train_stage1  # distillation only, on unlabeled frames: no labels, no tasks

        return train_stage1(cfg, run_dir, resume=resume, device=device, progress=progress)
    started = time.perf_counter()
    ctx = init_distributed(device)
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, run_dir, ctx, progress=progress)  # builds the model: SAK's teacher pass runs here
    if resume:
        trainer.resume()
    result = trainer.fit()
    return replace(result, seconds=time.perf_counter() - started)  # the whole run, set-up included

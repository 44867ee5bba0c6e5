"""Supervised multi-task training: one batched forward for all tasks, pluggable loss weighting (`weighting.py`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.adapters.tuner import adapter_regularization
from training.builders.registry import build_model
from training.builders.shared import count_parameters, resolved_backbone_overrides
from training.config import ExperimentConfig
from training.data.datasets import open_dataset
from training.data.labels import read_labels
from training.data.transforms import TaskDataset, build_eval_transform, build_train_transform, collate
from training.engine.distributed import (
    DistributedContext,
    average_buffers,
    average_gradients,
    average_tensors,
    broadcast_module,
)
from training.engine.trainer import Trainer
from training.engine.weighting import EqualWeighting, build_weighting
from training.eval.evaluate import evaluate_model, selection_score
from training.models.protocol import MultiTaskModel


def select_tasks(labels: dict[str, Any], tasks: Sequence[str] | None) -> dict[str, Any]:
    """`labels` with only the named tasks (None: all), e.g. one task for a single-task baseline of Δm."""
    if tasks is None:
        return labels
    names = [t["name"] for t in labels["tasks"]]
    unknown = [task for task in tasks if task not in names]
    if unknown or not tasks:
        raise ValueError(f"train.tasks={list(tasks)} must name tasks of the dataset {names} (or be null for all)")
    return {**labels, "tasks": [t for t in labels["tasks"] if t["name"] in tasks]}


def task_losses(model: MultiTaskModel, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
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


def split_parameters(model: MultiTaskModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trainable shared parameters, all trainable parameters); shared = used by every task's loss."""
    task_names = {name for names in model.task_parameter_names().values() for name in names}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [p for n, p in trainable if n not in task_names], [p for _, p in trainable]


def autocast_context(cfg: ExperimentConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (mode auto or bf16); plain fp32 on CPU, where autocast only slows small models."""
    mode = cfg.train.amp
    enabled = device.type == "cuda" and mode in ("auto", "bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class TaskTrainer(Trainer):
    """Trains a model family on the labelled tasks of `cfg.data.root`; the Trainer keeps the run folder."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, ctx: DistributedContext, progress: bool = True) -> None:
        if cfg.data.root is None:
            raise ValueError("data.root is not set: pass --data DIR (a folder made by `endostream data synth`)")
        super().__init__(cfg, run_dir, ctx, progress)
        self.labels = select_tasks(read_labels(Path(cfg.data.root)).to_dict(), cfg.train.tasks)
        self._build_data()
        self.model = build_model(cfg.model, self.labels["tasks"]).to(ctx.device)
        if cfg.model.backbone.checkpoint is not None:
            # Saved checkpoints must rebuild this architecture without the backbone file.
            cfg.model.backbone.overrides = resolved_backbone_overrides(self.model.backbone)
        broadcast_module(self.model, ctx)
        # Family hook before the first epoch, e.g. SAK's teachers fill their feature cache in one pass over the data.
        prepare = getattr(self.model, "prepare_training", None)
        if callable(prepare):
            prepare(self.train_set, batch_size=cfg.train.batch_size, progress=self.progress)
        self.shared_params, params = split_parameters(self.model)
        self.setup_optimization(params)
        self.weighting = build_weighting(
            cfg.train.weighting,
            self.model.tasks,
            beta=cfg.train.dbmtl_beta,
            mu=cfg.train.stch_mu,
            warmup_epochs=cfg.train.stch_warmup_epochs,
            task_weights=cfg.train.task_weights,
            grad_sync=(lambda grads: average_tensors(grads, ctx)) if ctx.enabled else None,
        )

    def _build_data(self) -> None:
        cfg = self.cfg
        size = tuple(cfg.model.image_size)
        train_transform = build_train_transform(
            size,
            hflip=cfg.data.hflip,
            scale=tuple(cfg.data.scale),
            color_jitter=cfg.data.color_jitter,
            blur_prob=cfg.data.blur_prob,
        )
        self.train_set = TaskDataset(open_dataset(cfg.data, cfg.data.train_split), train_transform, seed=cfg.train.seed)
        self.val_set = TaskDataset(open_dataset(cfg.data, cfg.data.val_split), build_eval_transform(size), seed=0)
        self.make_loader(self.train_set, collate)

    def describe(self) -> str:
        params = count_parameters(self.model)
        return (
            f"training {self.cfg.name}: {len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{params['total']:,} parameters ({params['trainable']:,} trainable)"
        )

    def extra_state(self) -> dict[str, Any]:
        return {"weighting": self.weighting.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.weighting.load_state_dict(state["weighting"])

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.train_set.set_epoch(epoch)
        totals: dict[str, float] = {}
        steps, regularization_total = 0, None
        bar = self.progress_bar(epoch)
        for batch in bar:
            batch = {k: v.to(self.ctx.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            losses, auxiliary, regularization = self._train_step(batch, epoch)
            if regularization is not None:
                regularization_total = (regularization_total or 0.0) + regularization
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

    def _train_step(
        self, batch: dict[str, Any], epoch: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], float | None]:
        """One optimiser step: (task losses, auxiliary losses, the adapter regulariser's value or None)."""
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
        value = None
        if regularization.requires_grad:
            regularization.backward()
            value = float(regularization.detach())
        self.optimizer.step()
        self.scheduler.step()
        return losses, auxiliary, value

    def validate(self) -> tuple[dict[str, Any], float]:
        metrics = evaluate_model(
            self.model, self.val_set, self.labels, batch_size=self.cfg.train.eval_batch_size, full=False
        )
        return metrics, selection_score(metrics)

    def epoch_summary(self, metrics: dict[str, Any]) -> str:
        return "val acc {:.3f} mIoU {:.3f}".format(
            metrics.get("activity", {}).get("accuracy", math.nan),
            metrics.get("segmentation", {}).get("miou", math.nan),
        )

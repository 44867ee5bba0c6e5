"""SAK stage 1 on the Trainer: distil the teachers into stem + TSAPs on the unlabeled frames of `cfg.data.root`.

Paper: shared/papers/sak.md; the family and stage 2: `training/builders/sak.py`. The Trainer keeps the run folder
(`config.yaml`, `metrics.jsonl` with the train loss per teacher and the held-out loss and Rep Sim per epoch, `last/` +
`trainer_state.pt`, `best/` = highest held-out Rep Sim); stage 2 starts from either with `model.sak.init_from`.
Stage 1 writes no merged checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from training.builders.registry import build_model
from training.builders.shared import resolved_backbone_overrides
from training.config import ExperimentConfig
from training.data.unlabeled import UnlabeledFrames
from training.distill.cache import TeacherFeatureCache, collate_images
from training.distill.losses import distillation_losses, representation_similarity
from training.engine.distributed import DistributedContext, average_gradients, broadcast_module
from training.engine.trainer import Trainer
from training.models.sak import SAK

logger = logging.getLogger(__name__)


def holdout_split(names: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: the `fraction` of frames with the smallest name hashes (stable across runs)."""
    count = len(names)
    held = round(fraction * count)
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    order = sorted(range(count), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
    chosen = set(order[:held])
    return [i for i in range(count) if i not in chosen], sorted(chosen)


@torch.inference_mode()
def held_out_scores(model: SAK, dataset: Any, batch_size: int) -> dict[str, Any]:
    """Mean distillation loss and Rep Sim (per teacher and their mean) of `model` over `dataset`."""
    was_training = model.training
    model.eval()
    device = model.pixel_mean.device
    loss_sum, images = 0.0, 0
    similarity: dict[str, float] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_images):
        batch = batch.to(device)
        student, targets = model.distill_features(batch), model.teacher_targets(batch)
        loss_sum += float(sum(distillation_losses(student, targets).values())) * len(batch)
        for key, values in representation_similarity(student, targets).items():
            similarity[key] = similarity.get(key, 0.0) + float(values.sum())
        images += len(batch)
    model.train(was_training)
    rep_sim = {key: value / max(images, 1) for key, value in similarity.items()}
    rep_sim["mean"] = sum(rep_sim.values()) / max(len(rep_sim), 1)
    return {"distill": loss_sum / max(images, 1), "rep_sim": rep_sim, "images": images}


class Stage1Trainer(Trainer):
    """SAK stage 1: no labels and no tasks; the selection score is the held-out Rep Sim."""

    merged_best = False  # stage 2 starts from RUN/best (model.sak.init_from)
    next_checkpoint = "best"
    stage_name = "stage 1 epoch"

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, ctx: DistributedContext, progress: bool = True) -> None:
        if cfg.data.root is None:
            raise ValueError("data.root is not set: pass --data DIR (a folder of images and/or videos) for stage 1")
        if not cfg.model.sak.teachers:
            raise ValueError("SAK stage 1 distils teachers: list them in model.sak.teachers")
        super().__init__(cfg, run_dir, ctx, progress)
        sak = cfg.model.sak
        frames = UnlabeledFrames(cfg.data.root, cfg.model.image_size, video_stride=sak.video_stride)
        train_idx, held_idx = holdout_split(frames.names, sak.holdout)
        self.train_set: Dataset = Subset(frames, train_idx)
        self.held_set: Dataset = Subset(frames, held_idx) if held_idx else self.train_set
        self.held_count = len(held_idx)
        if not held_idx:
            logger.warning(
                "no held-out frames (%d frames, holdout %.2f): Rep Sim is measured on the training frames",
                len(frames),
                sak.holdout,
            )
        self.labels = {"tasks": [], "source": {"stage": 1, "frames": str(cfg.data.root), "count": len(frames)}}
        self.model: SAK = build_model(cfg.model, []).to(ctx.device)
        if cfg.model.backbone.checkpoint is not None:
            cfg.model.backbone.overrides = resolved_backbone_overrides(self.model.backbone)
        broadcast_module(self.model, ctx)
        self.make_loader(self.train_set, collate_images)
        self.setup_optimization([p for p in self.model.parameters() if p.requires_grad])
        if isinstance(self.model.feature_source, TeacherFeatureCache):
            self.model.feature_source.fill(frames, batch_size=cfg.train.batch_size, progress=self.progress)

    def describe(self) -> str:
        return (
            f"SAK stage 1 {self.cfg.name}: {len(self.train_set)} training / {self.held_count} held-out frames, "
            f"teachers {list(self.model.paths)}, {sum(p.numel() for p in self.params):,} trainable parameters"
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        totals: dict[str, float] = {}
        steps = 0
        bar = self.progress_bar(epoch)
        for images in bar:
            images = images.to(self.ctx.device)
            terms = distillation_losses(self.model.distill_features(images), self.model.teacher_targets(images))
            loss = torch.stack(list(terms.values())).sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.params, self.ctx)
            self.step_optimizer()
            for name, value in terms.items():
                key = f"loss.distill.{name.split('/')[0]}"
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        return {key: value / max(1, steps) for key, value in totals.items()}

    def validate(self) -> tuple[dict[str, Any], float]:
        scores = held_out_scores(self.model, self.held_set, self.cfg.train.eval_batch_size)
        return scores, scores["rep_sim"]["mean"]

    def epoch_summary(self, metrics: dict[str, Any]) -> str:
        rep_sim = {k: round(v, 4) for k, v in metrics["rep_sim"].items()}
        return f"held-out distill {metrics['distill']:.4f}, Rep Sim {rep_sim}"

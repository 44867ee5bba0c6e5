"""Config -> model: one builder function per family, in a plain dict.

A new family adds `training/builders/<family>.py` with a `build(cfg, tasks, *, load_backbone_weights, merged)` that
returns a `training.models.protocol.MultiTaskModel`, and one line to `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from training.builders import bdta, endoarss, msam, sak
from training.config import ModelConfig
from training.data.labels import TASK_KINDS

FamilyBuilder = Callable[..., nn.Module]
FAMILIES: dict[str, FamilyBuilder] = {
    "endoarss": endoarss.build,
    "sak": sak.build,
    "bdta": bdta.build,
    "msam": msam.build,
}


def build_model(
    cfg: ModelConfig,
    tasks: Sequence[dict[str, Any]],
    *,
    load_backbone_weights: bool = True,
    merged: bool = False,
) -> nn.Module:
    """Build the model of `cfg.family` for `tasks` (the `tasks` list of labels.json).

    Every family returns a module with the `training.models.protocol.MultiTaskModel` interface, which is all the
    trainer, the evaluator, checkpoints and the exporter rely on.

    Args:
        cfg: model section of the experiment config.
        tasks: dicts with `name`, `kind` ("classification" | "segmentation") and `classes`.
        load_backbone_weights: read pretrained weights named by the config (False when a full checkpoint follows).
        merged: build the adapter-free merged form (per-task stacked weights) that merged checkpoints hold.
    """
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family {cfg.family!r} is not built by this version; known: {sorted(FAMILIES)}")
    for task in tasks:
        if task.get("kind") not in TASK_KINDS:
            raise ValueError(f"task {task.get('name')!r} has kind {task.get('kind')!r}; expected one of {TASK_KINDS}")
    return FAMILIES[cfg.family](cfg, tasks, load_backbone_weights=load_backbone_weights, merged=merged)

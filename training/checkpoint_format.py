"""The checkpoint folder format: `model.safetensors` + `config.json` (architecture) + `labels.json`.

Two forms share the layout (config.json `merged` tells them apart):
- unmerged: adapter factors kept (what training resumes from);
- merged: every LoRA/TESLA factor folded into per-task weights, no adapter tensor left (what export reads).
Both give the same predictions. This module reads and writes the files only; `training.checkpoint` adds building
the model (through the family registry), so a family builder can read a checkpoint without importing the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training.config import ExperimentConfig, from_dict

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LABELS_FILE = "labels.json"


@dataclass
class CheckpointFiles:
    """What a checkpoint folder holds, before any model is built."""

    config: ExperimentConfig
    labels: dict[str, Any]
    merged: bool
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    root: Path


def write_checkpoint_files(
    state: dict[str, torch.Tensor],
    config: ExperimentConfig,
    labels: dict[str, Any],
    out_dir: Path,
    *,
    merged: bool,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `state` (already merged when `merged`) with its config and labels into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    body = {
        "format_version": FORMAT_VERSION,
        "family": config.model.family,
        "merged": merged,
        "tasks": [{"name": t["name"], "kind": t["kind"], "num_classes": len(t["classes"])} for t in labels["tasks"]],
        "config": config.to_dict(),
        "meta": meta or {},
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(body, indent=2))
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    return out_dir


def read_checkpoint_files(path: str | Path, map_location: str | torch.device = "cpu") -> CheckpointFiles:
    """Read a checkpoint folder; raises with the missing file or the unsupported format version."""
    root = Path(path)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, LABELS_FILE) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root} is not an endostream checkpoint: missing {missing}; expected a directory written by "
            f"`endostream train` (e.g. RUN/best or RUN/best-merged)"
        )
    body = json.loads((root / CONFIG_FILE).read_text())
    version = body.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{root / CONFIG_FILE}: format_version {version!r} is not supported (expected 1)")
    return CheckpointFiles(
        config=from_dict(ExperimentConfig, body["config"]),
        labels=json.loads((root / LABELS_FILE).read_text()),
        merged=bool(body["merged"]),
        meta=body.get("meta", {}),
        state=load_file(str(root / WEIGHTS_FILE), device=str(map_location)),
        root=root,
    )

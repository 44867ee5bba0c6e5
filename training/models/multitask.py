"""What the multi-task models (EndoARSS, BDTA + MoTE, mSAM, SAK) share: 0-255 RGB is normalised inside the model, so
exported graphs include it, and a call may ask for a subset of the tasks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class MultiTaskModule(nn.Module, ABC):
    """Base of the multi-task models (the module side of `protocol.MultiTaskModel`). A subclass defines `tasks`,
    `task_parameter_names`, `inference_copy` and `forward_with_pre_logits` (`forward` returns its logits), and calls
    `register_pixel_stats` in `__init__`."""

    pixel_mean: Tensor
    pixel_std: Tensor
    task_kinds: dict[str, str]  # task -> "classification" | "segmentation", in model order

    @property
    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Task names in model order."""

    @abstractmethod
    def task_parameter_names(self) -> dict[str, list[str]]:
        """Parameter names owned by each task (heads, per-task adapters); the rest is shared."""

    @abstractmethod
    def inference_copy(self, height: int, width: int) -> MultiTaskModule:
        """An eval-mode copy for a fixed input size: adapters merged, training-only parts dropped (what export runs)."""

    @abstractmethod
    def forward_with_pre_logits(
        self, images: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Logits per task and pre-logit features (B F) per classification task, from one pass."""

    def forward(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Task name -> logits: B K for classification, B C H W (input size) for segmentation."""
        return self.forward_with_pre_logits(images, tasks)[0]

    def register_pixel_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """RGB mean and std in 0-255 units, as 1 3 1 1 buffers."""
        # Non-persistent: constants of the architecture, not weights (SAM `modeling/sam.py` pattern).
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """RGB images in 0-255 (uint8 or float), B 3 H W -> normalised float."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def requested_tasks(self, tasks: Sequence[str] | None) -> tuple[str, ...]:
        """`tasks` (None = all) as a tuple; ValueError naming any task this model does not have."""
        known = self.tasks
        tasks = tuple(tasks) if tasks is not None else known
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this model has {list(known)}")
        return tasks

"""What every model family gives the trainer, the evaluator, checkpoints and the exporter.

A family is free inside; at its surface it takes uint8-range images and task names and returns per-task logits,
says which of its parameters belong to one task (for per-task gradient methods such as DB-MTL), and can turn itself
into an adapter-free inference copy for a fixed input size (what the exporter traces).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Self, runtime_checkable

from torch import Tensor


@runtime_checkable
class MultiTaskModel(Protocol):
    task_kinds: dict[str, str]  # task -> "classification" | "segmentation", in model order

    @property
    def tasks(self) -> tuple[str, ...]: ...

    def __call__(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """images: B x 3 x H x W, 0-255 range (uint8 or float; the model normalises) -> logits per task:
        classification B x K, segmentation B x K x H x W at the input size."""
        ...

    def forward_with_pre_logits(
        self, images: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """`forward`'s logits plus, per classification task, the pre-logit features its classifier reads (B F, the
        `ActivityHead(pre_logits=True)` output), from the same pass. The temporal heads (training/temporal) and the
        bundle's `<task>_features` output consume them; `forward` returns the first element of this."""
        ...

    def task_parameter_names(self) -> dict[str, list[str]]:
        """Parameter names owned by each task (heads, per-task adapters); the rest is shared."""
        ...

    def inference_copy(self, height: int, width: int) -> MultiTaskModel:
        """An eval-mode copy for a fixed `height` x `width` input with every adapter merged, every training-only
        part (teachers, aligners, router noise) dropped, and position tables pinned; the original is untouched.
        The exporter traces this copy and nothing else (`export.graph.prepare_for_export`)."""
        ...

    def eval(self) -> Self: ...

    def requires_grad_(self, requires_grad: bool = True) -> Self: ...

"""EndoARSS: SMA -> DINOv2 ViT with shared LoRA + TESLA task adapters -> per-task heads.

Paper: Huang et al., "EndoARSS: Adapting Spatially-Aware Foundation Model for Efficient Activity Recognition and
Semantic Segmentation in Endoscopic Surgery" (shared/papers/endoarss.md, Fig. 3, eq. 2-6).

Where the public code departs from the paper we follow the paper (shared/MODEL_NOTES.md §1): SMA is trainable and
starts as the identity; each task has its own token stream through the backbone (TESLA adapters give each stream its
own low-rank weights) and all streams run as ONE batched pass, stacked task-major on the batch axis (the grouped
computation of eq. 6); the heads see the spatial token grid, not tokens viewed as channels.

When no layer of the backbone is task-specific (TESLA rank 0), every stream would be identical, so a single stream
is computed and shared by all heads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

from torch import Tensor, nn

from training.adapters.tuner import active_tasks, merged_copy
from training.models.heads import run_task_heads_with_pre_logits
from training.models.multitask import MultiTaskModule


class EndoARSS(MultiTaskModule):
    """Multi-task endoscopy model: activity recognition + semantic segmentation from one backbone pass."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        heads: nn.ModuleDict,
        task_kinds: dict[str, str],
        sma: nn.Module | None = None,
        per_task_streams: bool = True,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        """
        Args:
            backbone: ViT with `prepare_tokens`, `blocks`, `norm`, `num_prefix_tokens`, `patch_size`.
            heads: one head per task, keyed by task name; the key order is the stream order.
            task_kinds: task name -> "classification" | "segmentation".
            sma: module applied to the normalised image before the patch embedding (None = off).
            per_task_streams: run one token stream per task (needed when the backbone has per-task weights).
            pixel_mean: RGB mean in 0-255 units; normalisation lives in the model so exported graphs include it.
            pixel_std: RGB std in 0-255 units.
        """
        super().__init__()
        if set(heads) != set(task_kinds):
            raise ValueError(f"heads {sorted(heads)} and task kinds {sorted(task_kinds)} name different tasks")
        self.backbone = backbone
        self.heads = heads
        self.task_kinds = dict(task_kinds)
        self.sma = sma
        self.per_task_streams = per_task_streams
        self.register_pixel_stats(pixel_mean, pixel_std)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def forward_features(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-task spatial feature maps (B D h w) from the final normalised patch tokens."""
        tasks = self.requested_tasks(tasks)
        x = self.normalize(images)  # B 3 H W
        if self.sma is not None:
            x = self.sma(x)
        batch, _, height, width = x.shape
        tokens = self.backbone.prepare_tokens(x)  # B L D
        streams = len(tasks) if self.per_task_streams else 1
        if streams > 1:
            tokens = tokens.repeat(streams, 1, 1)  # (T B) L D, task-major
        context = active_tasks(self.backbone, tasks) if self.per_task_streams else nullcontext()
        with context:
            for block in self.backbone.blocks:
                tokens = block(tokens)
        tokens = self.backbone.norm(tokens)
        patch = tokens[:, self.backbone.num_prefix_tokens :]  # (T B) N D
        grid_h, grid_w = height // self.backbone.patch_size, width // self.backbone.patch_size
        maps = patch.transpose(1, 2).reshape(streams, batch, -1, grid_h, grid_w)  # T B D h w
        return {task: maps[i if streams > 1 else 0] for i, task in enumerate(tasks)}

    def forward_with_pre_logits(
        self, images: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Logits per task and pre-logit features (B F) per classification task (see the model protocol)."""
        features = self.forward_features(images, tasks)
        size = (images.shape[-2], images.shape[-1])
        return run_task_heads_with_pre_logits(self.heads, self.task_kinds, features, size)

    def task_parameter_names(self) -> dict[str, list[str]]:
        """Names of parameters that belong to one task only (its head and its TESLA factors)."""
        names: dict[str, list[str]] = {task: [] for task in self.tasks}
        for name, _ in self.named_parameters():
            owner = name.split(".")[1] if name.startswith("heads.") else _adapter_task(name)
            if owner in names:
                names[owner].append(name)
        return names

    def inference_copy(self, height: int, width: int) -> EndoARSS:
        """An eval-mode copy for a fixed `height` x `width` input: adapters folded per task, position grid pinned.

        A merged model (a `best-merged` checkpoint) has no adapter layer left and is copied as it is. The original
        model is untouched.
        """
        inference = copy.deepcopy(merged_copy(self))
        inference.backbone.pin_input_size(height, width)
        return inference.requires_grad_(False).eval()


def _adapter_task(name: str) -> str | None:
    """Adapter factors live in ParameterDicts keyed by adapter: "...lora_A.<task or 'shared'>"."""
    for key in (".lora_A.", ".lora_B."):
        if key in name:
            return name.split(key, 1)[1].split(".")[0]
    return None

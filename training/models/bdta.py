"""BDTA + MoTE: a frozen ViT main branch, a trainable task bypass branch beside it, cross-task fusion, task heads.

Paper: Yao et al., "Parameter-, Memory-, Time-Efficient Multi-Task Dense Vision Adaptation" (AAAI 2026;
shared/papers/bdta-mote.md, Fig. 2, eq. 1-11). No public code; decisions in shared/MODEL_NOTES.md §4.

    images -> normalise -> frozen ViT (no_grad)   embed tokens E, features F_1..F_N at N evenly spaced blocks
    A_t^0 = E for every task (eq. 2: the bypass starts from the main branch's patch embedding)
    A^i   = BDTA_i(F_i, A^{i-1})                  T B L C, all tasks stacked (training.layers.bdta)
    R_t   = MoTE({A^i}, {F_i})                    B L D per task (training.layers.mote)
    logits_t = head_t(R_t as a B D h w grid)      training.models.heads

Why this trains cheaply (section 3.4): the backbone runs under `torch.no_grad()` and hands over detached features,
so the autograd graph starts at the bypass branch. Backward never enters the backbone, and none of its activations
are kept for a backward pass (LoRA-style adapters inside the backbone need both).

The backbone stays in eval mode whatever `train()` says (it is frozen: no dropout or stochastic depth in the main
branch). Stage features are the final LayerNorm of the tapped blocks' patch tokens, as in DINOv2's
`get_intermediate_layers(norm=True)`; the bypass starts from the patch tokens with their position embedding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from training.layers.mote import MoTE
from training.models.heads import run_task_heads_with_pre_logits
from training.models.multitask import MultiTaskModule


def evenly_spaced_blocks(depth: int, stages: int) -> tuple[int, ...]:
    """Block indices closing each of `stages` equal parts of a `depth`-block ViT: 12, 4 -> (2, 5, 8, 11)."""
    if not 1 <= stages <= depth:
        raise ValueError(
            f"model.bdta.stages={stages} needs a backbone with at least that many blocks (it has {depth}); "
            f"lower model.bdta.stages or list model.bdta.blocks"
        )
    return tuple((i + 1) * depth // stages - 1 for i in range(stages))


class BDTAMoTE(MultiTaskModule):
    """Multi-task model: frozen ViT main branch + BDTA bypass branch + MoTE + per-task heads."""

    # Containers keyed by task name: a parameter under `<container>.<task>.` belongs to that task only.
    task_containers: ClassVar[tuple[str, ...]] = (
        "heads",
        "g2t_bottleneck",
        "t2g_bottleneck",
        "reduce",
        "router",
        "gamma",
        "fuse",
    )

    def __init__(
        self,
        *,
        backbone: nn.Module,
        stages: nn.ModuleList,
        mote: MoTE,
        heads: nn.ModuleDict,
        task_kinds: dict[str, str],
        blocks: Sequence[int],
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        """
        Args:
            backbone: ViT with `prepare_tokens`, `blocks`, `norm`, `num_prefix_tokens`, `patch_size`, `grid_size`;
                frozen here (requires_grad off, always in eval mode).
            stages: one `BDTA` per tapped block, in block order, built for the tasks of `heads` in the same order.
            mote: the `MoTE` over those stages and tasks.
            heads: one head per task, keyed by task name, reading B D h w grids of MoTE's width D.
            task_kinds: task name -> "classification" | "segmentation".
            blocks: backbone block indices whose outputs feed the stages (ascending, one per stage).
            pixel_mean: RGB mean in 0-255 units; normalisation lives in the model so exported graphs include it.
            pixel_std: RGB std in 0-255 units.
        """
        super().__init__()
        if set(heads) != set(task_kinds):
            raise ValueError(f"heads {sorted(heads)} and task kinds {sorted(task_kinds)} name different tasks")
        blocks = tuple(int(b) for b in blocks)
        depth = len(backbone.blocks)
        if (
            len(blocks) != len(stages)
            or list(blocks) != sorted(set(blocks))
            or not 0 <= blocks[0] <= blocks[-1] < depth
        ):
            raise ValueError(
                f"model.bdta.blocks {list(blocks)} must be {len(stages)} distinct ascending indices below {depth}"
            )
        for stage in stages:
            if tuple(stage.tasks) != tuple(heads):
                raise ValueError(f"BDTA stage tasks {list(stage.tasks)} differ from the heads {list(heads)}")
        self.backbone = backbone.requires_grad_(False).eval()
        self.stages = stages
        self.mote = mote
        self.heads = heads
        self.task_kinds = dict(task_kinds)
        self.blocks = blocks
        self.register_pixel_stats(pixel_mean, pixel_std)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def train(self, mode: bool = True) -> BDTAMoTE:
        super().train(mode)
        self.backbone.eval()  # the main branch is frozen: its dropout / stochastic depth never switch on
        return self

    def forward_main(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Frozen main branch (eq. 1) on a normalised B 3 H W image, without autograd.

        Returns:
            (patch embedding tokens B L C, [normalised patch tokens B L C of each tapped block]), all detached.
        """
        prefix = self.backbone.num_prefix_tokens
        features: list[Tensor] = []
        with torch.no_grad():
            tokens = self.backbone.prepare_tokens(x)  # B (1 + R + L) C
            embed = tokens[:, prefix:]  # B L C
            for index, block in enumerate(self.backbone.blocks[: self.blocks[-1] + 1]):
                tokens = block(tokens)
                if index in self.blocks:
                    features.append(self.backbone.norm(tokens)[:, prefix:])  # B L C
        return embed.detach(), [f.detach() for f in features]

    def forward_features(self, images: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-task spatial feature maps (B D h w) from MoTE, for `tasks` (default all)."""
        tasks = self.requested_tasks(tasks)
        x = self.normalize(images)  # B 3 H W
        grid = self.backbone.grid_size(x.shape[-2], x.shape[-1])
        embed, general = self.forward_main(x)
        # The bypass always carries every task: T2G and MoTE mix all of them into each task's result.
        adapted = embed.unsqueeze(0).expand(len(self.tasks), -1, -1, -1)  # T B L C
        experts = []
        for stage, features in zip(self.stages, general, strict=True):
            adapted = stage(features, adapted)  # T B L C
            experts.append(adapted)
        fused = self.mote(experts, general, [grid] * len(experts), tasks)  # task -> B L D
        # B L D -> B D h w
        return {t: f.transpose(1, 2).reshape(f.shape[0], -1, grid[0], grid[1]) for t, f in fused.items()}

    def forward_with_pre_logits(
        self, images: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Logits per task and pre-logit features (B F) per classification task (see the model protocol)."""
        features = self.forward_features(images, tasks)
        size = (images.shape[-2], images.shape[-1])
        return run_task_heads_with_pre_logits(self.heads, self.task_kinds, features, size)

    def task_parameter_names(self) -> dict[str, list[str]]:
        """Names of parameters kept per task: its head, G2T/T2G bottlenecks, MoTE reduce, router, gamma, fusion.

        Through T2G and (once gamma leaves zero) MoTE, a task's bypass parameters also reach the other tasks'
        losses; they are still one task's own weights, and per-task gradient methods (DB-MTL) give them the plain
        gradient of the summed losses, as for any task-specific parameter.
        """
        names: dict[str, list[str]] = {task: [] for task in self.tasks}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            for container, owner in zip(parts, parts[1:], strict=False):
                if container in self.task_containers and owner in names:
                    names[owner].append(name)
                    break
        return names

    def inference_copy(self, height: int, width: int) -> BDTAMoTE:
        """An eval-mode copy for a fixed `height` x `width` input: router noise MLPs dropped, position table pinned.

        Nothing to merge: the bypass branch is ordinary weights. The original model is untouched.
        """
        inference = copy.deepcopy(self)
        inference.mote.drop_noise()
        inference.backbone.pin_input_size(height, width)
        return inference.requires_grad_(False).eval()

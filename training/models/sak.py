"""SAK: Teacher-Agnostic Stem + Teacher-Specific Adapter Paths + Mixture-of-Representations routers + task heads.

Paper: Lu, Cao and Wang, "Swiss Army Knife: Synergizing Biases in Knowledge from Vision Foundation Models for
Multi-Task Learning" (ICLR 2025; shared/papers/sak.md, section 3, eq. 1-4). Facts from the public code and our
decisions: shared/MODEL_NOTES.md §2.

- TAS: our ViT, Z_0 = patch tokens with positions, Z_l = block l's output; features at the levels [L/4, L/2, 3L/4, L].
- TSAP per teacher k: adapters a_0 .. a_L, a(x) = x + s * W_up GELU(W_down x) (C -> C/4 -> C, s learnable from 1),
  R_0 = a_0(Z_0), R_l = a_l(R_{l-1} + Z_l) over all tokens; at each level the patch tokens of R_l get their own
  LayerNorm. An optional Linear aligner per (teacher, level) maps them to the teacher's width for distillation only.
- MoR router per (level, task): Linear C -> C/2, LayerNorm, GELU, Linear -> 2E on the raw TAS patch tokens, averaged
  over the tokens (one gate vector per image); the second half is the noise scale of noisy gating (Shazeer et al.
  2017), used in training only: softmax(clean + N(0, 1) * (softplus(raw) + 0.01)). Experts (E = 1 + K): the raw TAS
  tokens and each teacher's normalised TSAP output.
- Heads (ours, after the paper's simple head): segmentation projects every level's routed map with a linear C -> C/4,
  concatenates them at H/4 x W/4, then 3x3 conv-BN-GELU and a 1x1 classifier, upsampled to the input; the activity
  head pools the same kind of multi-level projection (3x3 conv-BN-ReLU, global pool, linear).

Teachers live in a `TeacherBank` (frozen, eval, never in `state_dict`); during training the model keeps its last TSAP
outputs so `auxiliary_losses` can add the distillation loss against the teachers' (possibly cached) features.
`inference_copy` drops teachers, aligners and router noise and folds a LoRA-tuned stem, for export.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.adapters.tuner import iter_adapter_layers, merge_and_unload
from training.distill.losses import distillation_losses
from training.distill.teachers import TeacherBank
from training.models.heads import ActivityHead, run_task_heads_with_pre_logits
from training.models.multitask import MultiTaskModule

NOISE_FLOOR = 0.01  # added to the softplus noise scale (public code)
TEACHERS = "teachers"  # module name of the TeacherBank; its keys never enter a state dict
FeatureSource = Callable[[Tensor], dict[str, list[Tensor]]]


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class TSAPAdapter(nn.Module):
    """Bottleneck unit of a Teacher-Specific Adapter Path: x + s * up(GELU(down(x))) (Houlsby et al. 2019, eq. 3)."""

    def __init__(self, dim: int, reduction: int = 4, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        """
        Args:
            dim: token width C.
            reduction: bottleneck factor r (hidden width C / r).
            act_layer: activation between the projections.
        """
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.up = nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.ones(1))
        self.apply(_init_linear)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.up(self.act(self.down(x)))  # B N C


class TeacherSpecificPath(nn.Module):
    """One teacher's adapters a_0 .. a_D (one beside the patch embedding and each block) and per-level norms."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_levels: int,
        reduction: int = 4,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        """
        Args:
            dim: token width C.
            depth: blocks the path runs beside (the last level's block index + 1); it holds depth + 1 adapters.
            num_levels: output levels, one LayerNorm each.
            reduction: adapter bottleneck factor.
            norm_layer: norm of the level outputs.
        """
        super().__init__()
        self.steps = nn.ModuleList(TSAPAdapter(dim, reduction) for _ in range(depth + 1))
        self.norms = nn.ModuleList(norm_layer(dim) for _ in range(num_levels))


class MoRRouter(nn.Module):
    """Mixture-of-Representations router: one softmax gate per expert and image from the stem's tokens (eq. 4)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        noisy_gating: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        """
        Args:
            dim: token width C.
            num_experts: E, the representations to weigh.
            noisy_gating: also predict a per-expert noise scale, applied in training only.
            act_layer: activation of the MLP.
            norm_layer: norm after the first projection.
        """
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"a router needs at least one expert, got {num_experts}")
        self.num_experts = num_experts
        self.noisy_gating = noisy_gating
        hidden = max(1, dim // 2)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = norm_layer(hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, num_experts * (2 if noisy_gating else 1))
        self.apply(_init_linear)

    def forward(self, tokens: Tensor) -> Tensor:
        """B N C stem tokens -> B E gates (each row sums to 1)."""
        # mean(fc2(h)) == fc2(mean(h)): fc2 is affine, so the tokens are averaged before it (N times fewer FLOPs).
        hidden = self.act(self.norm(self.fc1(tokens))).mean(dim=1)  # B C/2
        logits = self.fc2(hidden)  # B E or B 2E
        if self.noisy_gating:
            logits, raw_noise = logits.split(self.num_experts, dim=1)
            if self.training:
                logits = logits + torch.randn_like(logits) * (F.softplus(raw_noise) + NOISE_FLOOR)
        return logits.softmax(dim=1)  # B E

    def without_noise(self) -> MoRRouter:
        """A copy that computes only the clean gates (the noise half of the last layer removed)."""
        clean = copy.deepcopy(self)
        if self.noisy_gating:
            fc2 = nn.Linear(self.fc2.in_features, self.num_experts).to(self.fc2.weight.device, self.fc2.weight.dtype)
            with torch.no_grad():
                fc2.weight.copy_(self.fc2.weight[: self.num_experts])
                fc2.bias.copy_(self.fc2.bias[: self.num_experts])
            clean.fc2 = fc2
            clean.noisy_gating = False
        return clean


class LevelProjection(nn.Module):
    """Per-level linear C -> C_out on B C h w maps (a 1x1 conv), concatenated: L x (B C h w) -> B (L C_out) h w."""

    def __init__(self, dim: int, num_levels: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(dim, out_dim, kernel_size=1) for _ in range(num_levels))

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        return torch.cat([proj(x) for proj, x in zip(self.proj, levels, strict=True)], dim=1)


class MultiLevelSegmentationHead(nn.Module):
    """Levels -> linear C/4 each -> concat at H/4 -> 3x3 conv-BN-GELU -> 1x1 classes -> upsample to the input."""

    def __init__(self, dim: int, num_levels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        """
        Args:
            dim: token width C of the routed maps.
            num_levels: routed maps per image.
            num_classes: segmentation classes (background included).
            channels: width of the 3x3 fusion conv.
            dropout: dropout before the classifier.
        """
        super().__init__()
        self.project = LevelProjection(dim, num_levels, max(1, dim // 4))
        self.fuse = nn.Sequential(
            nn.Conv2d(num_levels * max(1, dim // 4), channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
        )
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, levels: Sequence[Tensor], output_size: tuple[int, int]) -> Tensor:
        """L x (B C h w) -> B K H W logits at `output_size`."""
        x = self.project(levels)  # B (L C/4) h w
        # Every level shares the token grid, so resizing the concatenation equals resizing each level first.
        quarter = (max(1, output_size[0] // 4), max(1, output_size[1] // 4))
        x = F.interpolate(x, size=quarter, mode="bilinear", align_corners=False)  # B (L C/4) H/4 W/4
        logits = self.classifier(self.drop(self.fuse(x)))  # B K H/4 W/4
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)


class PooledActivityHead(nn.Module):
    """Levels -> linear C/4 each, concatenated -> `ActivityHead` (3x3 conv-BN-ReLU, global pool, linear)."""

    def __init__(self, dim: int, num_levels: int, num_classes: int, channels: int = 256, pool: str = "avg") -> None:
        super().__init__()
        self.project = LevelProjection(dim, num_levels, max(1, dim // 4))
        self.head = ActivityHead(num_levels * max(1, dim // 4), num_classes, channels=channels, pool=pool)

    def forward(self, levels: Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        return self.head(self.project(levels), pre_logits=pre_logits)  # B K (B F with `pre_logits`)

    def classify(self, pre_logits: Tensor) -> Tensor:
        """Pre-logit features -> B K logits."""
        return self.head.classify(pre_logits)


class SAK(MultiTaskModule):
    """Multi-task model distilled from several frozen teachers (activity + segmentation from one stem pass)."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        paths: nn.ModuleDict,
        heads: nn.ModuleDict,
        task_kinds: dict[str, str],
        levels: Sequence[int],
        routers: nn.ModuleDict | None = None,
        stem_expert: bool = True,
        aligners: nn.ModuleDict | None = None,
        teachers: TeacherBank | None = None,
        gamma: float = 1.0,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        """
        Args:
            backbone: the Teacher-Agnostic Stem, a ViT with `prepare_tokens`, `blocks`, `num_prefix_tokens`.
            paths: teacher key -> `TeacherSpecificPath`; the key order is the expert order after the stem.
            heads: task -> `MultiLevelSegmentationHead` or `PooledActivityHead`.
            task_kinds: task -> "classification" | "segmentation".
            levels: stem block indices (0-based, increasing) whose outputs are the feature levels.
            routers: task -> ModuleList of one `MoRRouter` per level; None sums the experts instead (ablation).
            stem_expert: the raw stem tokens are the first expert.
            aligners: teacher key -> ModuleList of one Linear (or Identity) per level; used for distillation only.
            teachers: frozen teachers for live targets (None: a loaded or exported student).
            gamma: weight of the distillation loss returned by `auxiliary_losses`.
            pixel_mean: RGB mean in 0-255 units; the model normalises its uint8-range input.
            pixel_std: RGB std in 0-255 units.
        """
        super().__init__()
        if set(heads) != set(task_kinds):
            raise ValueError(f"heads {sorted(heads)} and task kinds {sorted(task_kinds)} name different tasks")
        self.levels = tuple(int(i) for i in levels)
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or self.levels[-1] >= len(backbone.blocks):
            raise ValueError(
                f"levels {list(self.levels)} must be increasing block indices below {len(backbone.blocks)}"
            )
        if not paths and not stem_expert:
            raise ValueError("no expert: give teachers (TSAPs) or keep the stem as an expert")
        if routers is not None and set(routers) != set(heads):
            raise ValueError(f"routers {sorted(routers)} and heads {sorted(heads)} name different tasks")
        if aligners is not None and set(aligners) != set(paths):
            raise ValueError(f"aligners {sorted(aligners)} and paths {sorted(paths)} name different teachers")
        self.backbone = backbone
        self.paths = paths
        self.routers = routers
        self.heads = heads
        self.aligners = aligners
        self.task_kinds = dict(task_kinds)
        self.stem_expert = stem_expert
        self.gamma = float(gamma)
        self.per_task_streams = False  # one stem pass serves every task (training.checkpoint.merged_copy reads it)
        if teachers is not None:
            self.add_module(TEACHERS, teachers)
        else:
            self.teachers = None
        # Where `auxiliary_losses` gets the teachers' maps: None = run the teachers here (see teacher_features).
        self.feature_source: FeatureSource | None = None
        self._pending: tuple[dict[str, list[Tensor]], tuple[int, int]] | None = None
        self.register_pixel_stats(pixel_mean, pixel_std)
        self.register_load_state_dict_post_hook(_ignore_teacher_keys)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    @property
    def teacher_keys(self) -> tuple[str, ...]:
        return tuple(self.paths.keys())

    # ------------------------------------------------------------------------------------------------ features
    def forward_levels(self, x: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]], tuple[int, int]]:
        """Stem and TSAP patch tokens at every level for a normalised image.

        Returns:
            (stem tokens Z_l (B N C) per level, teacher key -> normalised R_l (B N C) per level, token grid (h, w)).
        """
        grid = self.backbone.grid_size(x.shape[-2], x.shape[-1])
        prefix = self.backbone.num_prefix_tokens
        tokens = self.backbone.prepare_tokens(x)  # Z_0: B (P + N) C
        residual = {key: path.steps[0](tokens) for key, path in self.paths.items()}  # R_0
        stem: list[Tensor] = []
        experts: dict[str, list[Tensor]] = {key: [] for key in self.paths}
        for index, block in enumerate(self.backbone.blocks[: self.levels[-1] + 1]):
            tokens = block(tokens)  # Z_l
            for key, path in self.paths.items():
                residual[key] = path.steps[index + 1](residual[key] + tokens)  # R_l = a_l(R_{l-1} + Z_l)
            if index in self.levels:
                level = self.levels.index(index)
                stem.append(tokens[:, prefix:])
                for key, path in self.paths.items():
                    experts[key].append(path.norms[level](residual[key][:, prefix:]))
        return stem, experts, grid

    def route(
        self,
        stem: Sequence[Tensor],
        experts: Mapping[str, Sequence[Tensor]],
        grid: tuple[int, int],
        tasks: Sequence[str],
    ) -> dict[str, list[Tensor]]:
        """Task -> its routed B C h w map per level (gate-weighted sum of the experts)."""
        routed: dict[str, list[Tensor]] = {task: [] for task in tasks}
        for level, stem_tokens in enumerate(stem):
            pool = ([stem_tokens] if self.stem_expert else []) + [experts[key][level] for key in self.paths]
            stacked = torch.stack(pool)  # E B N C
            if self.routers is None:
                summed = _to_map(stacked.sum(0), grid)
            for task in tasks:
                if self.routers is None:
                    routed[task].append(summed)
                    continue
                gates = self.routers[task][level](stem_tokens)  # B E
                mixed = (gates.t()[:, :, None, None] * stacked).sum(0)  # B N C
                routed[task].append(_to_map(mixed, grid))
        return routed

    def forward_with_pre_logits(
        self, images: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Logits per task and pre-logit features (B F) per classification task (see the model protocol)."""
        tasks = self.requested_tasks(tasks)
        stem, experts, grid = self.forward_levels(self.normalize(images))
        if self.training and self.gamma > 0 and self.paths:
            self._pending = (experts, grid)  # what auxiliary_losses distils (same forward pass)
        routed = self.route(stem, experts, grid, tasks)
        size = (images.shape[-2], images.shape[-1])
        return run_task_heads_with_pre_logits(self.heads, self.task_kinds, {t: routed[t] for t in tasks}, size)

    # ----------------------------------------------------------------------------------------------- distillation
    def aligned(self, experts: Mapping[str, Sequence[Tensor]], grid: tuple[int, int]) -> dict[str, list[Tensor]]:
        """TSAP tokens -> B C_k h w maps in each teacher's width (through the aligners)."""
        out = {}
        for key, maps in experts.items():
            layers = self.aligners[key] if self.aligners is not None else [nn.Identity()] * len(maps)
            out[key] = [_to_map(layer(tokens.float()), grid) for layer, tokens in zip(layers, maps, strict=True)]
        return out

    def distill_features(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Teacher key -> the student's aligned maps per level (stage 1: no routers, no heads)."""
        _, experts, grid = self.forward_levels(self.normalize(images))
        return self.aligned(experts, grid)

    def teacher_features(self, images: Tensor, keys: Sequence[str] | None = None) -> dict[str, list[Tensor]]:
        """Run the frozen teachers on uint8-range B 3 H W images: teacher key -> maps per level (no gradients)."""
        if self.teachers is None:
            raise RuntimeError(
                "this SAK model has no teachers (built from a checkpoint); build it with load_backbone_weights=True "
                "and model.sak.teachers to distil"
            )
        return self.teachers(self.normalize(images.to(self.pixel_mean.device)), keys)

    def teacher_targets(self, images: Tensor) -> dict[str, list[Tensor]]:
        """The teachers' maps for a batch: from `feature_source` (e.g. the disk cache) when set, else live."""
        source = self.feature_source if self.feature_source is not None else self.teacher_features
        return source(images)

    def prepare_training(self, dataset: Any, *, batch_size: int = 32, progress: bool = True) -> None:
        """Trainer hook before the first epoch: the teachers' one pass over `dataset` into the feature cache."""
        fill = getattr(self.feature_source, "fill", None)
        if fill is not None and self.gamma > 0 and self.teachers is not None:
            fill(dataset, batch_size=batch_size, progress=progress)

    def auxiliary_losses(self, batch: Mapping[str, Any], outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """gamma * distillation loss of the last training forward, per teacher (`distill.<teacher>`), for the trainer.

        Empty when not training, gamma is 0 or there is no teacher.
        """
        pending, self._pending = self._pending, None
        if pending is None or self.teachers is None:
            return {}
        experts, grid = pending
        terms = distillation_losses(self.aligned(experts, grid), self.teacher_targets(batch["image"]))
        return {
            f"distill.{key}": self.gamma * torch.stack([v for k, v in terms.items() if k.split("/")[0] == key]).sum()
            for key in self.paths
        }

    # ----------------------------------------------------------------------------------------------- protocol
    def task_parameter_names(self) -> dict[str, list[str]]:
        """Parameters of one task only: its head and its routers."""
        names: dict[str, list[str]] = {task: [] for task in self.tasks}
        for name, _ in self.named_parameters():
            root, _, rest = name.partition(".")
            if root in ("heads", "routers"):
                names[rest.split(".")[0]].append(name)
        return names

    def inference_copy(self, height: int, width: int) -> SAK:
        """Eval-mode copy for a fixed input: no teachers, aligners or router noise, LoRA folded, positions pinned."""
        backbone = self.backbone
        layers = [layer for _, layer in iter_adapter_layers(backbone)]
        if layers:
            backbone = merge_and_unload(backbone, layers[0].tasks[0])  # shared LoRA only: the same for every task
        else:
            backbone = copy.deepcopy(backbone)
        backbone.pin_input_size(height, width)
        backbone.norm = nn.Identity()  # the levels are raw block outputs: the stem's final norm is never used
        routers = None
        if self.routers is not None:
            routers = nn.ModuleDict(
                {task: nn.ModuleList(r.without_noise() for r in levels) for task, levels in self.routers.items()}
            )
        copied = SAK(
            backbone=backbone,
            paths=copy.deepcopy(self.paths),
            heads=copy.deepcopy(self.heads),
            task_kinds=self.task_kinds,
            levels=self.levels,
            routers=routers,
            stem_expert=self.stem_expert,
            gamma=0.0,
            pixel_mean=tuple(self.pixel_mean.flatten().tolist()),
            pixel_std=tuple(self.pixel_std.flatten().tolist()),
        ).to(self.pixel_mean.device)
        return copied.requires_grad_(False).eval()


def _to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])  # B N C -> B C h w


def _ignore_teacher_keys(module: nn.Module, incompatible: Any) -> None:
    # Teachers are rebuilt from their own checkpoints, never from a student state dict (TeacherBank.state_dict).
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if f".{TEACHERS}." not in f".{k}"]

"""Task heads on the spatial token grid (B D h w): DeepLabV3-style segmentation and a pooled activity classifier.

DeepLabV3: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (2017), section 3.3: Atrous
Spatial Pyramid Pooling = one 1x1 conv, three 3x3 convs with atrous rates (6, 12, 18) at output stride 16, and
image-level features (global average pool -> 1x1 conv -> upsample), each with BatchNorm, concatenated and projected by
a 1x1 conv. EndoARSS (shared/papers/endoarss.md, IV-B) uses "separately customized adaptations of DeepLabV3" for
both tasks; the public code's activity head is 3x3 conv-BN-ReLU -> global pool -> linear (shared/MODEL_NOTES.md §1).

Ours differs from the public code in two ways (MODEL_NOTES §1): the heads read the h x w token grid (the public
code views the 256 x 768 token matrix as a 16 x 48 "image" with tokens as channels), and the atrous rates are scaled to
that grid (`aspp_rates_for_grid`) instead of DeepLab's 12 / 24 / 36, which on a 16 x 16 grid would reach past the map.

Batch 1: the image-pooling branch has no BatchNorm. Its input is one value per channel and image, so BatchNorm there
normalises over the batch alone; training at batch 1 then fails ("Expected more than 1 value per channel") and small
batches give noisy statistics. The branch is conv (with bias) -> ReLU, and the projection's BatchNorm right after the
concatenation normalises it together with the other branches. Every other BatchNorm sees B x h x w values per
channel, so any batch size trains when the grid has more than one cell; in eval mode BatchNorm uses running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DeepLabV3's reference: a 513-px crop at output stride 16 gives a 33-cell map, i.e. ~32 cells per side.
DEEPLAB_RATES = (6, 12, 18)
DEEPLAB_GRID = 32
POOLS = ("avg", "max", "avgmax")  # activity head global pooling


def aspp_rates_for_grid(
    grid: tuple[int, int], base_rates: Sequence[int] = DEEPLAB_RATES, base_grid: int = DEEPLAB_GRID
) -> tuple[int, ...]:
    """Atrous rates for an h x w feature grid, scaled from DeepLabV3's rates for its ~32-cell grid.

    Each rate becomes round(rate * s / base_grid) on the shorter side s (so no branch looks further, relative to the
    map, than DeepLab's did on its square map), at least 1. Rates are then made strictly increasing where the grid
    allows (a rate equal to the previous one is raised by one) and capped at s - 1: a dilation of s or more keeps only
    the kernel's centre tap inside the map, which makes the branch a second 1x1 conv. When the grid is too small for
    distinct rates, capped duplicates remain, so the number of branches (and the parameter shapes) never depends on
    the grid. Examples: 32 -> (6, 12, 18); 64 -> (12, 24, 36), DeepLab's output-stride-8 rates; 16 (224 px, patch 14)
    -> (3, 6, 9); 8 -> (2, 3, 5); 4 -> (1, 2, 3); 2 -> (1, 1, 1).

    Args:
        grid: (h, w) of the feature grid.
        base_rates: rates at the reference grid, in any order (returned sorted).
        base_grid: side of the reference grid.

    Returns:
        One rate per base rate, ascending.
    """
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be two positive sizes (h, w), got {tuple(grid)}")
    if not base_rates or min(base_rates) < 1:
        raise ValueError(f"base_rates must be positive integers, got {tuple(base_rates)}")
    if base_grid < 1:
        raise ValueError(f"base_grid must be positive, got {base_grid}")
    side = min(int(grid[0]), int(grid[1]))
    limit = max(1, side - 1)
    rates: list[int] = []
    for rate in sorted(int(r) for r in base_rates):
        scaled = max(1, int(rate * side / base_grid + 0.5))  # round half up
        if rates:
            scaled = max(scaled, rates[-1] + 1)
        rates.append(min(scaled, limit))
    return tuple(rates)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    # No conv bias: the BatchNorm shift replaces it. "Same" padding for odd kernels at any dilation.
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv -> ReLU -> broadcast back to h x w (no BatchNorm)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)  # B C 1 1
        # Bilinear upsampling of a 1x1 map is a broadcast; expand says so and exports as a plain Expand.
        return self.act(self.conv(pooled)).expand(-1, -1, x.shape[-2], x.shape[-1])  # B C' h w


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): B C h w -> B C' h w."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = DEEPLAB_RATES,
        dropout: float = 0.1,
    ) -> None:
        """
        Args:
            in_channels: channels of the input grid.
            out_channels: channels of every branch and of the output.
            rates: atrous rates, one 3x3 branch each (see `aspp_rates_for_grid`).
            dropout: dropout after the projection.
        """
        super().__init__()
        if any(int(r) < 1 for r in rates):
            raise ValueError(f"ASPP rates must be positive integers, got {tuple(rates)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ASPP dropout must be in [0, 1), got {dropout}")
        self.rates = tuple(int(r) for r in rates)
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in self.rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([branch(x) for branch in self.branches], dim=1)  # B (n C') h w
        return self.project(x)  # B C' h w


class SegmentationHead(nn.Module):
    """ASPP -> 3x3 conv-BN-ReLU -> 1x1 classifier, upsampled bilinearly to the image size."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: Sequence[int] = (3, 6, 9),
        dropout: float = 0.1,
    ) -> None:
        """
        Args:
            in_channels: token width D of the feature grid.
            num_classes: segmentation classes C (background included).
            channels: width of the ASPP branches and the refinement conv.
            rates: ASPP atrous rates; the default suits a 16 x 16 grid (224 px, patch 14), see `aspp_rates_for_grid`.
            dropout: dropout after the ASPP projection.
        """
        super().__init__()
        self.aspp = ASPP(in_channels, channels, rates=rates, dropout=dropout)
        self.refine = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: Tensor, output_size: tuple[int, int]) -> Tensor:
        """B D h w features -> B C H W logits at `output_size` (H, W)."""
        x = self.refine(self.aspp(features))  # B c h w
        logits = self.classifier(x)  # B C h w
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)  # B C H W


class ActivityHead(nn.Module):
    """3x3 conv-BN-ReLU -> global pool -> dropout -> linear: B D h w -> B K logits."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.0, pool: str = "avg"
    ) -> None:
        """
        Args:
            in_channels: token width D of the feature grid.
            num_classes: activity classes K.
            channels: width of the conv.
            dropout: dropout on the pooled features, before the classifier.
            pool: "avg" (the paper's code), "max", or "avgmax" (both, concatenated). Max pooling keeps a cue
                that covers a few tokens (a tool tip in blood) from being averaged away over the grid.
        """
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ActivityHead dropout must be in [0, 1), got {dropout}")
        if pool not in POOLS:
            raise ValueError(f"ActivityHead pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.num_features = channels * (2 if pool == "avgmax" else 1)
        self.conv = _conv_bn_relu(in_channels, channels, 3)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """B D h w -> B K logits, or the B `num_features` pooled features when `pre_logits` (timm's convention)."""
        x = self.conv(features).flatten(2)  # B c hw
        if self.pool == "avg":
            x = x.mean(dim=2)
        elif self.pool == "max":
            x = x.amax(dim=2)
        else:
            x = torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)  # B 2c
        x = self.drop(x)
        return x if pre_logits else self.fc(x)  # B K

    def classify(self, pre_logits: Tensor) -> Tensor:
        """B `num_features` pre-logit features (`forward(..., pre_logits=True)`) -> B K logits."""
        return self.fc(pre_logits)


class ProjectedHead(nn.Module):
    """A 1x1 conv from the feature width to `width`, then `head`: the same head on a narrower feature map.

    Lets a model whose features are wider than another's use heads of the same shape (e.g. the LoRA baseline of
    `endostream bench train` at BDTA's MoTE width), so head parameters compare like for like.
    """

    def __init__(self, in_channels: int, width: int, head: nn.Module) -> None:
        """
        Args:
            in_channels: feature width D.
            width: the width `head` reads.
            head: a `SegmentationHead` or `ActivityHead` built for `width` input channels.
        """
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=1)
        self.head = head

    def forward(self, features: Tensor, **kwargs) -> Tensor:
        return self.head(self.proj(features), **kwargs)  # B D h w -> B width h w -> head

    def classify(self, pre_logits: Tensor) -> Tensor:
        """Pre-logit features -> logits of the wrapped `ActivityHead`."""
        return self.head.classify(pre_logits)


def run_task_heads_with_pre_logits(
    heads: nn.ModuleDict, task_kinds: dict[str, str], features: dict[str, Tensor], size: tuple[int, int]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Task name -> logits from per-task features: B K (classification), B C H W at `size` (segmentation); and each
    classification head's pre-logit features (B F), from the same pass.

    Segmentation heads take `forward(x, output_size=size)`; classification heads `forward(x, pre_logits=True)` and
    `classify(pre_logits)` (`ActivityHead`)."""
    logits: dict[str, Tensor] = {}
    pre: dict[str, Tensor] = {}
    for task, feature in features.items():
        if task_kinds[task] == "segmentation":
            logits[task] = heads[task](feature, output_size=size)
        else:
            pre[task] = heads[task](feature, pre_logits=True)  # B F
            logits[task] = heads[task].classify(pre[task])  # B K
    return logits, pre

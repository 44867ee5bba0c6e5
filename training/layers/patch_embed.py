"""Patch embedding: non-overlapping p x p patches -> tokens, and resampling of its kernel to another patch size.

ViT (Dosovitskiy et al. 2021): a stride-p convolution. The kernel resampling is the pseudo-inverse resize of FlexiViT
(Beyer et al., "FlexiViT: One Model for All Patch Sizes", CVPR 2023, eq. 6): the new kernel w' minimises the change of
<x, w> = <resize(x), w'> over patches x, which is exact when the patch size grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """B C H W image -> B N D tokens (N = (H / p) * (W / p), row-major)."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768, *, bias: bool = True) -> None:
        """
        Args:
            patch_size: side p of the square patches (also the stride).
            in_chans: input channels.
            embed_dim: token width D.
            bias: learn a bias in the projection.
        """
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # B C H W -> B D h w
        return x.flatten(2).transpose(1, 2)  # B N D


def resample_patch_embed(weight: Tensor, new_size: tuple[int, int]) -> Tensor:
    """Resample a patch-embedding kernel to another patch size with FlexiViT's pseudo-inverse resize.

    Args:
        weight: D C p q kernel.
        new_size: target kernel size (p', q').

    Returns:
        D C p' q' kernel in the input dtype (computed in float32).
    """
    old_size = (weight.shape[-2], weight.shape[-1])
    new_size = (int(new_size[0]), int(new_size[1]))
    if old_size == new_size:
        return weight
    old_numel = old_size[0] * old_size[1]
    # Column j of the resize matrix is the resized j-th basis patch: resize(x) = R x for flattened patches x.
    basis = torch.eye(old_numel, dtype=torch.float32, device=weight.device).reshape(old_numel, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode="bilinear", align_corners=False, antialias=True)
    resize_matrix = resized.reshape(old_numel, -1).T  # p'q' x pq
    # <x, w> = <R x, w'> for every x  <=>  R^T w' = w  =>  w' = pinv(R^T) w, i.e. rows: W' = W pinv(R).
    flat = weight.float().reshape(-1, old_numel)  # (D C) pq
    new_flat = flat @ torch.linalg.pinv(resize_matrix)  # (D C) p'q'
    return new_flat.reshape(*weight.shape[:2], *new_size).to(weight.dtype)

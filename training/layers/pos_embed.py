"""Resampling of learned absolute position embeddings to another token grid.

Follows dinov2 `DinoVisionTransformer.interpolate_pos_encoding` and timm `layers/pos_embed.py`
`resample_abs_pos_embed`: prefix tokens (cls, and any others stored in the table) are kept apart, the patch grid is
resampled bicubically in float32 and the result is returned in the input dtype (bicubic resampling in half precision
shifts the embeddings).

Two conventions exist and checkpoints are only reproduced exactly with their own:

* `interpolate_offset > 0` (original DINOv2 without registers, offset 0.1): the output grid is requested through
  `scale_factor = (new + offset) / old`, a historical kludge against floating-point error in the output size
  (https://github.com/facebookresearch/dino/issues/8). PyTorch then maps coordinates with that scale factor, not with
  new / old, so the result differs from a size-based resize whenever the grid changes.
* `interpolate_offset == 0` (original DINOv2 with registers, and every Hugging Face DINOv2): the output is requested
  by `size=`.

`antialias=True` selects PyTorch's antialiased bicubic kernel (a = -0.5, PIL style, instead of a = -0.75), which
changes the result even when upsampling; DINOv2-with-registers checkpoints (original and Hugging Face) use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def resample_pos_embed(
    pos_embed: Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    *,
    num_prefix_tokens: int = 1,
    interpolate_offset: float = 0.0,
    antialias: bool = False,
) -> Tensor:
    """Resample a position-embedding table to a new patch grid.

    Args:
        pos_embed: 1 (P + h*w) D table, P prefix tokens first, then the grid row-major.
        new_size: target grid (rows, cols).
        old_size: grid of the table (default: square, inferred from its length).
        num_prefix_tokens: leading rows that are not part of the grid; returned unchanged.
        interpolate_offset: > 0 for the scale-factor convention of original DINOv2 (0.1), 0 for `size=`.
        antialias: use the antialiased bicubic kernel.

    Returns:
        1 (P + H*W) D table in the dtype of `pos_embed`; the input itself when the grid is unchanged.
    """
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"position embedding has {num_grid} grid tokens, which is not a square grid; pass old_size=(rows, cols)"
            )
        old_size = (side, side)
    old_h, old_w = int(old_size[0]), int(old_size[1])
    new_h, new_w = int(new_size[0]), int(new_size[1])
    if old_h * old_w != num_grid:
        raise ValueError(f"old_size {old_size} does not match the {num_grid} grid tokens of the position embedding")
    if (new_h, new_w) == (old_h, old_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # 1 D h w
    if interpolate_offset:
        scale = ((new_h + interpolate_offset) / old_h, (new_w + interpolate_offset) / old_w)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
    assert grid.shape[-2:] == (new_h, new_w), f"resampled grid {tuple(grid.shape[-2:])} != {(new_h, new_w)}"
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)  # 1 (H W) D
    return torch.cat((prefix, grid.to(pos_embed.dtype)), dim=1)

"""Pieces every ViT-style encoder here shares (DINOv2 ViT, CLIP tower, SAM encoder): the patch grid of an input,
block selection for intermediate outputs, splitting those outputs into prefix and patch tokens, the Linear init, and
pinning the position table to one input size for export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn


def patch_grid(height: int, width: int, patch: int, fix: Literal["crop", "pad"] = "crop") -> tuple[int, int]:
    """Token grid (rows, cols) of a `height` x `width` input cut into `patch` x `patch` patches.

    Raises:
        ValueError: if a side is not a positive multiple of the patch size; the message names the nearest valid
            sizes and `fix` (what the caller should do to the input besides resizing).
    """
    if height % patch or width % patch or height < patch or width < patch:
        lower = (max(height // patch, 1) * patch, max(width // patch, 1) * patch)
        upper = (-(-height // patch) * patch, -(-width // patch) * patch)
        raise ValueError(
            f"input size {height}x{width} is not a multiple of the patch size {patch}; "
            f"nearest valid sizes: {lower[0]}x{lower[1]} or {upper[0]}x{upper[1]} (resize or {fix} the input)"
        )
    return height // patch, width // patch


def take_block_indices(indices: int | Sequence[int], depth: int) -> list[int]:
    """Sorted block indices: the last `indices` blocks for an int, else the listed ones (negative counts from the end).

    Raises:
        ValueError: naming the first index out of range for `depth` blocks.
    """
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; this model has {depth}")
        return list(range(depth - indices, depth))
    for index in indices:
        if not -depth <= index < depth:
            raise ValueError(f"block index {index} is out of range for {depth} blocks")
    return sorted({index % depth for index in indices})


def block_outputs(
    blocks: nn.ModuleList,
    tokens: Tensor,
    take: Sequence[int],
    norm: nn.Module | None,
    *,
    num_prefix_tokens: int,
    grid: tuple[int, int],
    reshape: bool,
    return_prefix_tokens: bool,
) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
    """Run `blocks` on B (P + h*w) D `tokens` up to the last of `take` and return those blocks' outputs.

    Args:
        norm: applied to each output taken (None: raw block outputs).
        num_prefix_tokens: P, the class and register tokens before the patch tokens.
        reshape: patch tokens as B D h w maps instead of B (h*w) D.
        return_prefix_tokens: (patches, B P D prefix) pairs instead of patches alone.
    """
    outputs: list[Tensor] = []
    for index, block in enumerate(blocks[: take[-1] + 1]):
        tokens = block(tokens)
        if index in take:
            outputs.append(norm(tokens) if norm is not None else tokens)
    prefixes = [out[:, :num_prefix_tokens] for out in outputs]
    patches = [out[:, num_prefix_tokens:] for out in outputs]
    if reshape:
        # B N D -> B D h w
        patches = [p.reshape(p.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for p in patches]
    if return_prefix_tokens:
        return list(zip(patches, prefixes, strict=True))
    return patches


def init_linear_layers(module: nn.Module) -> None:
    """Trunc-normal(0.02) weights and zero biases for every Linear below `module`."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def pin_position_table(encoder: nn.Module, height: int, width: int) -> None:
    """Store `encoder`'s position table resampled for a fixed `height` x `width` input, in place.

    An exported graph then adds a constant instead of resampling the table (a bicubic Resize) on every call; the
    values are exactly those `interpolate_pos_encoding` computes for this size. Encoders without a table
    (`pos_embed` None) only record the size.
    """
    grid = encoder.grid_size(height, width)
    if encoder.pos_embed is not None:
        with torch.no_grad():
            table = encoder.interpolate_pos_encoding(grid).detach().clone()
        encoder.pos_embed = nn.Parameter(table, requires_grad=False)
    encoder.pos_grid = grid
    encoder.img_size = (height, width)

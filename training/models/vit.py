"""Vision Transformer that reproduces DINOv2 ViT-S/B/L/g/14, with or without register tokens.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT, ICLR 2021); Oquab et al., "DINOv2: Learning Robust
Visual Features without Supervision" (TMLR 2024); Darcet et al., "Vision Transformers Need Registers" (ICLR 2024).
Layout and forward semantics follow dinov2 `models/vision_transformer.py` (`DinoVisionTransformer`), so original
checkpoints load by name; the forward API is split as in timm `VisionTransformer` (`forward_features`,
`forward_head`, `forward_intermediates`). Blocks are never chunked; chunked checkpoint keys (`blocks.C.I.*`) are
renamed on load.

Token layout: [cls, registers (R), patches (h*w, row-major)]. The position embedding covers cls + patches only and is
resampled to the input grid (see `training.layers.pos_embed` for the two interpolation conventions); registers are
inserted after the position embedding is added, as in DINOv2.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.layers.attention import Attention
from training.layers.block import Block
from training.layers.layer_scale import LayerScale
from training.layers.mlp import Mlp, SwiGLUFFN, swiglu_hidden_features
from training.layers.patch_embed import PatchEmbed
from training.layers.pos_embed import resample_pos_embed
from training.models.token_grid import (
    block_outputs,
    init_linear_layers,
    patch_grid,
    pin_position_table,
    take_block_indices,
)

logger = logging.getLogger(__name__)

# `blocks.<chunk>.<block>.` of checkpoints saved with dinov2's `block_chunks > 0`; the block index is global.
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(\d+)\.")
# DINOv2's masked-image-modelling token is used only in pre-training (iBOT loss); this backbone does not keep it.
_PRETRAINING_ONLY_KEYS = ("mask_token",)


def remap_legacy_keys(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Rename chunked block keys to `blocks.I.*` and drop pre-training-only keys, in place.

    Args:
        state_dict: state dict in the DINOv2 layout (possibly chunked).
        prefix: prefix of this model's keys inside `state_dict`.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        if local in _PRETRAINING_ONLY_KEYS:
            del state_dict[key]
            continue
        match = _CHUNKED_BLOCK_KEY.match(local)
        if match is not None:
            state_dict[f"{prefix}blocks.{match.group(1)}.{local[match.end() :]}"] = state_dict.pop(key)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _check_shape(img_size: tuple[int, int], patch_size: int, embed_dim: int, num_heads: int, ffn_layer: str) -> None:
    """Raise on sizes a VisionTransformer cannot be built with, naming the bad value."""
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if ffn_layer not in ("mlp", "swiglu"):
        raise ValueError(f"ffn_layer {ffn_layer!r} is not supported; expected 'mlp' or 'swiglu'")


def _ffn_hidden(embed_dim: int, mlp_ratio: float, ffn_layer: str) -> int:
    """Feed-forward hidden width from `mlp_ratio` (SwiGLU keeps 2/3 of it, rounded up to 8)."""
    hidden = int(embed_dim * mlp_ratio)
    return swiglu_hidden_features(hidden) if ffn_layer == "swiglu" else hidden


class VisionTransformer(nn.Module):
    """DINOv2-style ViT: patch embedding, cls + optional register tokens, LayerScale blocks, final LayerNorm."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_hidden_dim: int | None = None,
        ffn_layer: Literal["mlp", "swiglu"] = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = 1e-5,
        num_register_tokens: int = 0,
        drop_path_rate: float = 0.0,
        layer_norm_eps: float = 1e-6,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        num_classes: int = 0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        block_fn: Callable[..., nn.Module] = Block,
        attn_layer: Callable[..., nn.Module] = Attention,
    ) -> None:
        """
        Args:
            img_size: training resolution; sets the size of the position-embedding table (grid img_size / patch).
            patch_size: side of the square patches.
            in_chans: input channels.
            embed_dim: token width D.
            depth: number of blocks.
            num_heads: attention heads per block.
            mlp_ratio: feed-forward width as a multiple of D (SwiGLU then keeps 2/3 of it, rounded up to 8).
            mlp_hidden_dim: exact feed-forward hidden width; overrides `mlp_ratio` (used when loading checkpoints).
            ffn_layer: "mlp" (GELU MLP, fc1/fc2) or "swiglu" (w12/w3, DINOv2 ViT-g).
            qkv_bias: bias in the fused qkv projections.
            proj_bias: bias in the attention output projections.
            ffn_bias: biases in the feed-forward layers.
            init_values: LayerScale initial value; None disables LayerScale.
            num_register_tokens: register tokens R inserted after the cls token (0 or 4 for DINOv2).
            drop_path_rate: stochastic depth, growing linearly from 0 to this value over the blocks.
            layer_norm_eps: epsilon of every LayerNorm.
            interpolate_offset: position-embedding resampling convention: 0.1 for original DINOv2 without registers,
                0 for registers and Hugging Face checkpoints (`training.layers.pos_embed`).
            interpolate_antialias: antialiased bicubic position-embedding resampling (DINOv2 with registers).
            num_classes: size of a linear head on the cls token; 0 = no head (`forward` returns the cls token).
            act_layer: activation of the MLP.
            norm_layer: normalisation factory, called as `norm_layer(dim, eps=layer_norm_eps)`.
            block_fn: block factory with the signature of `training.layers.block.Block`.
            attn_layer: attention factory passed to each block.
        """
        super().__init__()
        img_size = _pair(img_size)
        _check_shape(img_size, patch_size, embed_dim, num_heads, ffn_layer)
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if mlp_hidden_dim is None:
            mlp_hidden_dim = _ffn_hidden(embed_dim, mlp_ratio, ffn_layer)
        self.mlp_hidden_dim = mlp_hidden_dim
        self.ffn_layer = ffn_layer
        ffn_fn = SwiGLUFFN if ffn_layer == "swiglu" else partial(Mlp, act_layer=act_layer)
        norm_fn = partial(norm_layer, eps=layer_norm_eps)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        # Python floats, not torch.linspace: factories must also run under torch.device("meta").
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            block_fn(
                embed_dim,
                num_heads,
                mlp_hidden_dim,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                init_values=init_values,
                drop_path=rate,
                norm_layer=norm_fn,
                attn_layer=attn_layer,
                ffn_layer=ffn_fn,
            )
            for rate in rates
        )
        self.norm = norm_fn(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2 initialisation: trunc-normal(0.02) position embedding and Linear weights, ~0 cls/register tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        init_linear_layers(self)
        for module in self.modules():
            if isinstance(module, LayerScale):
                module.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed", "cls_token", "register_tokens"}

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) of an input of `height` x `width` pixels (`token_grid.patch_grid`)."""
        return patch_grid(height, width, self.patch_size)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Accept original DINOv2 state dicts as they are: chunked block keys and the pre-training mask token.
        remap_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Position embedding (1 (1 + h*w) D) for a token grid, with this model's resampling convention."""
        return resample_pos_embed(
            self.pos_embed,
            grid,
            self.pos_grid,
            num_prefix_tokens=1,
            interpolate_offset=self.interpolate_offset,
            antialias=self.interpolate_antialias,
        )

    def pin_input_size(self, height: int, width: int) -> None:
        """Fix the position table to a `height` x `width` input, in place (for export; `pin_position_table`)."""
        pin_position_table(self, height, width)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """B 3 H W image (normalised) -> B (1 + R + h*w) D tokens: cls, registers, patches with positions added."""
        batch, _, height, width = x.shape
        grid = self.grid_size(height, width)
        tokens = self.patch_embed(x)  # B N D
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)  # B (1 + N) D
        tokens = tokens + self.interpolate_pos_encoding(grid).to(tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1)  # B R D
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)  # B (1 + R + N) D
        return tokens

    def forward_features(self, x: Tensor) -> dict[str, Any]:
        """Run all blocks and the final norm.

        Returns:
            dict with `x_norm_clstoken` (B D), `x_norm_regtokens` (B R D), `x_norm_patchtokens` (B N D),
            `x_prenorm` (B (1 + R + N) D, before the final norm) and `grid_size` (h, w).
        """
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : self.num_prefix_tokens],
            "x_norm_patchtokens": normed[:, self.num_prefix_tokens :],
            "x_prenorm": tokens,
            "grid_size": grid,
        }

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] = 1,
        *,
        norm: bool = True,
        reshape: bool = True,
        return_prefix_tokens: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
        """Outputs of selected blocks (dinov2 `get_intermediate_layers`, timm `forward_intermediates`).

        Args:
            x: B 3 H W image.
            indices: n = the last n blocks, or a list of block indices (negative counts from the end); outputs come
                in block order. Blocks after the last one taken are not run.
            norm: apply the final norm to each output.
            reshape: return B D h w maps instead of B N D tokens.
            return_prefix_tokens: also return each block's B (1 + R) D prefix tokens, as (patches, prefix) pairs.
        """
        take = take_block_indices(indices, len(self.blocks))
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.prepare_tokens(x)
        return block_outputs(
            self.blocks,
            tokens,
            take,
            self.norm if norm else None,
            num_prefix_tokens=self.num_prefix_tokens,
            grid=grid,
            reshape=reshape,
            return_prefix_tokens=return_prefix_tokens,
        )

    def forward_head(self, features: dict[str, Any], pre_logits: bool = False) -> Tensor:
        """cls token (B D), through the head unless `pre_logits`."""
        cls_token = features["x_norm_clstoken"]
        return cls_token if pre_logits else self.head(cls_token)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

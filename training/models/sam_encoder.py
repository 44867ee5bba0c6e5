"""SAM image encoder: a plain ViT with windowed attention, a few global blocks and a convolutional neck.

Paper: Kirillov et al., "Segment Anything" (ICCV 2023), whose encoder is the ViTDet backbone (Li et al., ECCV 2022):
patch embedding 16, absolute position embedding on the 64 x 64 grid of a 1024 px input, blocks with 14 x 14 windowed
attention except the blocks in `global_attn_indexes`, decomposed relative position bias (MViTv2), then a neck
1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d to `out_chans` (256) channels. Module names follow
`segment_anything/modeling/image_encoder.py` (`ImageEncoderViT`) so released checkpoints load with one rename
(`mlp.lin1/lin2` -> `mlp.fc1/fc2`, our MLP); see `training.weights.sam`.

Tokens stay on the grid (B H W C) throughout. Inputs of other sizes (multiples of 16) resample the absolute position
embedding bicubically by size (ViTDet `get_abs_pos`); global blocks resample their relative-position tables linearly
(SAM `get_rel_pos`); windowed blocks are unaffected. SAM itself always runs at 1024 x 1024 (longest side resized,
zero-padded); `pixel_mean` / `pixel_std` below are the normalisation its checkpoints expect (0-255 RGB units), applied
by the caller (the multi-task model) before `forward_features`, like for every backbone here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from training.layers.block import DropPath
from training.layers.mlp import Mlp
from training.layers.patch_embed import PatchEmbed
from training.layers.pos_embed import resample_pos_embed
from training.layers.windowed_attention import (
    RelPosAttention,
    resample_rel_pos,
    window_partition,
    window_unpartition,
)
from training.models.token_grid import init_linear_layers, patch_grid, pin_position_table, take_block_indices

# SAM `build_sam.py`: the normalisation the released checkpoints were trained with (RGB, 0-255 units).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a B C H W map (SAM `common.py`, ConvNeXt's channels-first LayerNorm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)  # B 1 H W
        var = (x - mean).pow(2).mean(1, keepdim=True)  # B 1 H W
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class WindowedBlock(nn.Module):
    """Pre-norm transformer block on a B H W C grid; attention within windows (window_size > 0) or global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_features: int,
        *,
        qkv_bias: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] = (64, 64),
        use_rel_pos: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
            dim: token width D.
            num_heads: attention heads.
            mlp_hidden_features: hidden width of the MLP.
            qkv_bias: bias in the fused qkv projection.
            window_size: window side; 0 = global attention over the whole grid.
            input_size: token grid at the training resolution (sizes the relative tables of global blocks).
            use_rel_pos: decomposed relative position bias in the attention.
            drop_path: stochastic-depth probability of both residual branches.
            norm_layer: normalisation factory called with `dim`.
            act_layer: activation of the MLP.
        """
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = RelPosAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=(window_size, window_size) if window_size > 0 else input_size,
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden_features, act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1], x.shape[2]
        y = self.norm1(x)  # B H W D
        if self.window_size > 0:
            y, padded = window_partition(y, self.window_size)  # (B nW) w w D
            y = self.attn(y)
            y = window_unpartition(y, self.window_size, padded, (height, width))  # B H W D
        else:
            y = self.attn(y)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))  # B H W D


class SamImageEncoder(nn.Module):
    """SAM ViT image encoder: `forward_features(x)["image_embeddings"]` is the B out_chans H/16 W/16 neck output."""

    pixel_mean = SAM_PIXEL_MEAN
    pixel_std = SAM_PIXEL_STD

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_hidden_dim: int | None = None,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ) -> None:
        """
        Args:
            img_size: training resolution; sets the position table (grid img_size / patch) and the relative tables
                of the global blocks.
            patch_size: side of the square patches.
            in_chans: input channels.
            embed_dim: token width D.
            depth: number of blocks.
            num_heads: attention heads per block.
            mlp_ratio: MLP width as a multiple of D.
            mlp_hidden_dim: exact MLP hidden width; overrides `mlp_ratio`.
            out_chans: channels of the neck output (256 in every released SAM).
            qkv_bias: bias in the fused qkv projections.
            use_abs_pos: learned absolute position embedding (B gh gw D).
            use_rel_pos: decomposed relative position bias in every block.
            window_size: window side of the windowed blocks; 0 makes every block global.
            global_attn_indexes: blocks with global attention.
            layer_norm_eps: epsilon of the block LayerNorms.
            drop_path_rate: stochastic depth, growing linearly from 0 to this value over the blocks.
            act_layer: activation of the MLPs.
            norm_layer: normalisation factory, called as `norm_layer(dim, eps=layer_norm_eps)`.
        """
        super().__init__()
        img_size = _pair(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        global_attn_indexes = tuple(int(i) for i in global_attn_indexes)
        outside = [i for i in global_attn_indexes if not 0 <= i < depth]
        if outside:
            raise ValueError(f"global_attn_indexes {list(outside)} are outside the {depth} blocks")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_features = self.out_chans = out_chans
        self.num_heads = num_heads
        self.window_size = window_size
        self.global_attn_indexes = global_attn_indexes
        self.mlp_hidden_dim = mlp_hidden_dim if mlp_hidden_dim is not None else int(embed_dim * mlp_ratio)
        self.layer_norm_eps = layer_norm_eps
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.pos_grid, embed_dim)) if use_abs_pos else None
        norm_fn = partial(norm_layer, eps=layer_norm_eps)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            WindowedBlock(
                embed_dim,
                num_heads,
                self.mlp_hidden_dim,
                qkv_bias=qkv_bias,
                window_size=0 if index in global_attn_indexes else window_size,
                input_size=self.pos_grid,
                use_rel_pos=use_rel_pos,
                drop_path=rate,
                norm_layer=norm_fn,
                act_layer=act_layer,
            )
            for index, rate in enumerate(rates)
        )
        # Sequential indices 0-3 are the module names of SAM checkpoints (`neck.0.weight` ... `neck.3.bias`). The
        # neck's epsilon is 1e-6 whatever the blocks use (SAM `LayerNorm2d`, transformers `SamVisionNeck`).
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.init_weights()

    def init_weights(self) -> None:
        """trunc-normal(0.02) position embedding and Linear weights, zero relative tables (a fresh SAM/ViTDet)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_linear_layers(self)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed"}

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) of an input of `height` x `width` pixels (`token_grid.patch_grid`)."""
        return patch_grid(height, width, self.patch_size, fix="pad")

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Absolute position embedding (1 h w D) for a token grid; bicubic by size when the grid differs."""
        assert self.pos_embed is not None
        if grid == self.pos_grid:
            return self.pos_embed
        flat = self.pos_embed.reshape(1, self.pos_grid[0] * self.pos_grid[1], self.embed_dim)  # 1 N D
        flat = resample_pos_embed(flat, grid, self.pos_grid, num_prefix_tokens=0)
        return flat.reshape(1, grid[0], grid[1], self.embed_dim)

    def pin_input_size(self, height: int, width: int) -> None:
        """Fix the position table and the global blocks' relative tables to a `height` x `width` input, in place.

        The values the encoder computes on the fly for that size (bicubic position table, linear relative tables);
        windowed blocks keep theirs, since a window does not depend on the input size. For export.
        """
        grid = self.grid_size(height, width)
        with torch.no_grad():
            for block in self.blocks:
                attn = block.attn
                if block.window_size > 0 or not attn.use_rel_pos:
                    continue
                for axis, size in (("rel_pos_h", grid[0]), ("rel_pos_w", grid[1])):
                    table = resample_rel_pos(getattr(attn, axis), 2 * size - 1).detach().clone()
                    setattr(attn, axis, nn.Parameter(table, requires_grad=False))
        pin_position_table(self, height, width)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """B 3 H W image (normalised) -> B h w D patch tokens with the absolute position embedding added."""
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)  # B N D
        tokens = tokens.reshape(x.shape[0], grid[0], grid[1], self.embed_dim)  # B h w D
        if self.pos_embed is not None:
            tokens = tokens + self.interpolate_pos_encoding(grid).to(tokens.dtype)
        return tokens

    def forward_features(self, x: Tensor) -> dict[str, Any]:
        """Run all blocks and the neck.

        Returns:
            dict with `image_embeddings` (B out_chans h w, the neck output SAM's mask decoder reads),
            `x_patchtokens` (B (h*w) D, last block output before the neck, row-major) and `grid_size` (h, w).
        """
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        embeddings = self.neck(tokens.permute(0, 3, 1, 2))  # B h w D -> B D h w -> B C h w
        return {
            "image_embeddings": embeddings,
            "x_patchtokens": tokens.reshape(x.shape[0], grid[0] * grid[1], self.embed_dim),
            "grid_size": grid,
        }

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] = 1) -> list[Tensor]:
        """B D h w outputs of selected blocks, in block order; blocks after the last one taken are not run.

        Args:
            x: B 3 H W image.
            indices: n = the last n blocks, or a list of block indices (negative counts from the end).
        """
        take = take_block_indices(indices, len(self.blocks))
        tokens = self.prepare_tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks[: take[-1] + 1]):
            tokens = block(tokens)
            if index in take:
                outputs.append(tokens.permute(0, 3, 1, 2).contiguous())  # B h w D -> B D h w
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["image_embeddings"]

    def describe(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this architecture (recorded in checkpoints, compared on load)."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.patch_embed.proj.in_channels,
            "embed_dim": self.embed_dim,
            "depth": len(self.blocks),
            "num_heads": self.num_heads,
            "mlp_hidden_dim": self.mlp_hidden_dim,
            "out_chans": self.out_chans,
            "qkv_bias": self.blocks[0].attn.qkv.bias is not None,
            "use_abs_pos": self.pos_embed is not None,
            "use_rel_pos": self.blocks[0].attn.use_rel_pos,
            "window_size": self.window_size,
            "global_attn_indexes": self.global_attn_indexes,
            "layer_norm_eps": self.layer_norm_eps,
        }

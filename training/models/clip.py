"""CLIP ViT vision tower: the image encoder of CLIP, with its pooled output and its patch tokens.

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (ICML 2021); OpenAI
`clip/model.py` (`VisionTransformer`) and open_clip `transformer.py` (same layout). Structure: stride-p convolution
without bias, a learned class embedding, a learned position embedding (cls + grid), LayerNorm before the blocks
(`ln_pre`), pre-norm blocks (fused qkv attention, MLP with QuickGELU for OpenAI weights or GELU for most open_clip
ones), and LayerNorm after the blocks applied to the class token only (`ln_post`), then an optional bias-free
projection to the joint image-text space (`proj`, here `head`). Weight conversion lives in `training.weights.clip`.

Output contract (`forward_features`), matching transformers `CLIPVisionModel`: `x_norm_clstoken` is CLIP's pooled
output (post-LayerNorm class token, before the projection: `pooler_output`) and `x_norm_patchtokens` the encoder's
last hidden patch tokens *without* the post-LayerNorm (`last_hidden_state[:, 1:]`; the key name is shared with the
DINOv2 backbone so consumers read both the same way). `forward` returns the projected image embedding
(`CLIPModel.get_image_features`).

Other input sizes resample the position grid bicubically by size, without antialiasing (transformers
`CLIPVisionEmbeddings.interpolate_pos_encoding`, open_clip `resize_pos_embed`). `pixel_mean` / `pixel_std` are the
normalisation CLIP was trained with (0-255 RGB units), applied by the caller before `forward_features`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.layers.attention import Attention
from training.layers.block import Block
from training.layers.mlp import Mlp
from training.layers.patch_embed import PatchEmbed
from training.layers.pos_embed import resample_pos_embed
from training.models.token_grid import (
    block_outputs,
    init_linear_layers,
    patch_grid,
    pin_position_table,
    take_block_indices,
)

# OpenAI `clip/clip.py` `_transform`, in 0-255 units.
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)

ClipAct = Literal["quick_gelu", "gelu"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


class CLIPVisionTransformer(nn.Module):
    """CLIP ViT image tower: patch embedding, class token, ln_pre, pre-norm blocks, ln_post on the class token."""

    pixel_mean = CLIP_PIXEL_MEAN
    pixel_std = CLIP_PIXEL_STD
    num_register_tokens = 0
    num_prefix_tokens = 1

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_hidden_dim: int | None = None,
        output_dim: int | None = 512,
        act: ClipAct = "quick_gelu",
        layer_norm_eps: float = 1e-5,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        block_fn: Callable[..., nn.Module] = Block,
        attn_layer: Callable[..., nn.Module] = Attention,
    ) -> None:
        """
        Args:
            img_size: training resolution; sets the size of the position table (grid img_size / patch).
            patch_size: side of the square patches.
            in_chans: input channels.
            embed_dim: token width D (`width` in OpenAI CLIP).
            depth: number of blocks.
            num_heads: attention heads per block (OpenAI: width // 64).
            mlp_ratio: MLP width as a multiple of D.
            mlp_hidden_dim: exact MLP hidden width; overrides `mlp_ratio`.
            output_dim: width of the image-text projection; None = no projection (`forward` returns the pooled
                output).
            act: MLP activation: "quick_gelu" (OpenAI weights) or "gelu" (most open_clip weights). Checkpoints do not
                record it.
            layer_norm_eps: epsilon of every LayerNorm.
            drop_path_rate: stochastic depth, growing linearly from 0 to this value over the blocks.
            norm_layer: normalisation factory, called as `norm_layer(dim, eps=layer_norm_eps)`.
            block_fn: block factory with the signature of `training.layers.block.Block`.
            attn_layer: attention factory passed to each block.
        """
        super().__init__()
        img_size = _pair(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.mlp_hidden_dim = mlp_hidden_dim if mlp_hidden_dim is not None else int(embed_dim * mlp_ratio)
        self.output_dim = output_dim
        self.act = act
        self.layer_norm_eps = layer_norm_eps
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        norm_fn = partial(norm_layer, eps=layer_norm_eps)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.norm_pre = norm_fn(embed_dim)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            block_fn(
                embed_dim,
                num_heads,
                self.mlp_hidden_dim,
                init_values=None,  # no LayerScale in CLIP
                drop_path=rate,
                norm_layer=norm_fn,
                attn_layer=attn_layer,
                ffn_layer=partial(Mlp, act_layer=ACTIVATIONS[act]),
            )
            for rate in rates
        )
        self.norm = norm_fn(embed_dim)
        self.head = nn.Linear(embed_dim, output_dim, bias=False) if output_dim else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """OpenAI CLIP initialisation of the embeddings (std D^-0.5); trunc-normal(0.02) Linear weights."""
        scale = self.embed_dim**-0.5
        nn.init.normal_(self.cls_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        init_linear_layers(self)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed", "cls_token"}

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) of an input of `height` x `width` pixels (`token_grid.patch_grid`)."""
        return patch_grid(height, width, self.patch_size)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Position embedding (1 (1 + h*w) D) for a token grid: bicubic by size, no antialiasing."""
        return resample_pos_embed(self.pos_embed, grid, self.pos_grid, num_prefix_tokens=1)

    def pin_input_size(self, height: int, width: int) -> None:
        """Fix the position table to a `height` x `width` input, in place (for export; `pin_position_table`)."""
        pin_position_table(self, height, width)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """B 3 H W image (normalised) -> B (1 + h*w) D tokens after ln_pre."""
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)  # B N D
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)  # B (1+N) D
        tokens = tokens + self.interpolate_pos_encoding(grid).to(tokens.dtype)
        return self.norm_pre(tokens)

    def forward_features(self, x: Tensor) -> dict[str, Any]:
        """Run all blocks; ln_post on the class token only.

        Returns:
            dict with `x_norm_clstoken` (B D, the pooled output before the projection), `x_norm_patchtokens`
            (B N D, last hidden patch tokens, not post-normed), `x_norm_regtokens` (B 0 D, CLIP has no registers),
            `x_prenorm` (B (1 + N) D, the last hidden state) and `grid_size` (h, w).
        """
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        return {
            "x_norm_clstoken": self.norm(tokens[:, 0]),
            "x_norm_regtokens": tokens[:, 1:1],
            "x_norm_patchtokens": tokens[:, 1:],
            "x_prenorm": tokens,
            "grid_size": grid,
        }

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] = 1,
        *,
        norm: bool = False,
        reshape: bool = True,
        return_prefix_tokens: bool = False,
    ) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
        """Outputs of selected blocks (timm `forward_intermediates`).

        Args:
            x: B 3 H W image.
            indices: n = the last n blocks, or a list of block indices (negative counts from the end); outputs come
                in block order. Blocks after the last one taken are not run.
            norm: apply ln_post to every token (CLIP itself post-norms only the class token, so the default is off
                and the last output equals `x_norm_patchtokens`).
            reshape: return B D h w maps instead of B N D tokens.
            return_prefix_tokens: also return each block's B 1 D class token, as (patches, prefix) pairs.
        """
        take = take_block_indices(indices, len(self.blocks))
        grid = self.grid_size(x.shape[-2], x.shape[-1])
        tokens = self.prepare_tokens(x)
        return block_outputs(
            self.blocks,
            tokens,
            take,
            self.norm if norm else None,
            num_prefix_tokens=1,
            grid=grid,
            reshape=reshape,
            return_prefix_tokens=return_prefix_tokens,
        )

    def forward_head(self, features: dict[str, Any], pre_logits: bool = False) -> Tensor:
        """Projected image embedding (B output_dim), or the pooled output (B D) with `pre_logits`."""
        pooled = features["x_norm_clstoken"]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

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
            "output_dim": self.output_dim,
            "act": self.act,
            "layer_norm_eps": self.layer_norm_eps,
        }

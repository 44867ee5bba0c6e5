"""Pre-norm transformer block with LayerScale and stochastic depth, DINOv2 layout.

x = x + drop_path(ls1(attn(norm1(x))));  x = x + drop_path(ls2(mlp(norm2(x))))
(ViT, Dosovitskiy et al. 2021; LayerScale, Touvron et al. 2021; stochastic depth, Huang et al. 2016; module names as
in dinov2 `layers/block.py` so checkpoints load without renaming). Sub-layers are always called as modules, so
adapter wrappers that keep input and output shapes can replace any of them; any leading batch size works, including
T task streams stacked as one (T*B) N D batch.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from training.layers.attention import Attention
from training.layers.layer_scale import LayerScale
from training.layers.mlp import Mlp


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # B 1 1
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """One transformer block: attention and feed-forward residual branches, each pre-normed and layer-scaled."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_features: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_layer: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        """
        Args:
            dim: token width D.
            num_heads: attention heads.
            mlp_hidden_features: hidden width of the feed-forward layer.
            qkv_bias: bias in the fused qkv projection.
            proj_bias: bias in the attention output projection.
            ffn_bias: biases in the feed-forward layer.
            init_values: LayerScale initial value; None disables LayerScale (ls1/ls2 become identities).
            drop_path: stochastic-depth probability of both residual branches.
            attn_drop: dropout on attention probabilities.
            proj_drop: dropout after the attention output projection.
            norm_layer: normalisation factory called with `dim`.
            attn_layer: attention factory, called as `attn_layer(dim, num_heads, qkv_bias=, proj_bias=, ...)`.
            ffn_layer: feed-forward factory, called as `ffn_layer(dim, mlp_hidden_features, bias=ffn_bias)`.
        """
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(dim, mlp_hidden_features, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))  # B N D
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))  # B N D

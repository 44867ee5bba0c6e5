"""Multi-head self-attention with one fused qkv projection (ViT, Dosovitskiy et al. 2021; DINOv2 layout).

The q, k and v weights live in ONE `nn.Linear(dim, 3 * dim)` whose output rows are ordered q, then k, then v, exactly
as in DINOv2 checkpoints (`blocks.N.attn.qkv`). The projections are always *called* as modules, so adapter wrappers
(LoRA, TESLA) can replace `qkv` or `proj` with a module of the same input and output shapes.

The attention product uses `F.scaled_dot_product_attention` (PyTorch picks the flash / memory-efficient kernel, the
fused path that dinov2's xformers `MemEffAttention` provides) unless `training.layers.export_mode.exportable()` is
active at call time; then it uses the explicit softmax(QK^T / sqrt(d)) V that every exporter can trace.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.layers.export_mode import is_exportable

logger = logging.getLogger(__name__)

_LOGGED_PATHS: set[str] = set()


def _log_attention_path(path: str) -> None:
    # Logged once per path at first use (not on import); skipped while torch.compile traces, where logging
    # calls would break the graph.
    if path in _LOGGED_PATHS or torch.compiler.is_compiling():
        return
    _LOGGED_PATHS.add(path)
    logger.info("attention: using %s", path)


class Attention(nn.Module):
    """Multi-head self-attention over a token sequence of any batch size."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: token width D.
            num_heads: number of heads; must divide `dim`.
            qkv_bias: learn a bias for the fused qkv projection.
            proj_bias: learn a bias for the output projection.
            attn_drop: dropout on the attention probabilities (training only).
            proj_drop: dropout after the output projection.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop_p = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape  # B N D
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # B N 3 h d
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B h N d)
        if is_exportable():
            _log_attention_path("explicit softmax(QK^T)V (export mode)")
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B h N N
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v  # B h N d
        else:
            _log_attention_path("fused F.scaled_dot_product_attention")
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)  # B N D
        return self.proj_drop(self.proj(out))

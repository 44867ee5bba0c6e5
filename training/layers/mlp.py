"""Transformer feed-forward layers: the GELU MLP (ViT) and the SwiGLU FFN of DINOv2 ViT-g.

SwiGLU: Shazeer, "GLU Variants Improve Transformer" (2020). DINOv2 (`dinov2/layers/swiglu_ffn.py`) keeps the gate and
value projections in ONE linear layer `w12` (gate rows first, value rows second) and the output projection in `w3`;
the hidden width is 2/3 of the MLP width rounded up to a multiple of 8 (`swiglu_hidden_features`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_features(mlp_hidden_features: int) -> int:
    """SwiGLU hidden width for a plain-MLP width, as DINOv2 computes it (6144 -> 4096 for ViT-g)."""
    return (int(mlp_hidden_features * 2 / 3) + 7) // 8 * 8


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        *,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        """
        Args:
            in_features: input width.
            hidden_features: hidden width (default: `in_features`).
            out_features: output width (default: `in_features`).
            act_layer: activation module factory.
            drop: dropout after the activation and after fc2.
            bias: learn biases in fc1 and fc2.
        """
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))  # ... H
        return self.drop(self.fc2(x))  # ... D


class SwiGLUFFN(nn.Module):
    """w3(SiLU(gate) * value) with [gate; value] = w12(x)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        *,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        """
        Args:
            in_features: input width.
            hidden_features: width of the gated hidden layer, used as given (see `swiglu_hidden_features` for the
                DINOv2 rounding from an MLP width).
            out_features: output width (default: `in_features`).
            drop: dropout after w3.
            bias: learn biases in w12 and w3.
        """
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # 2 x (... H)
        return self.drop(self.w3(F.silu(gate) * value))  # ... D

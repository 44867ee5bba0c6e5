"""LayerScale: a learned per-channel scale on each residual branch.

Touvron et al., "Going deeper with Image Transformers" (CaiT, 2021), used by DINOv2 (`ls1`, `ls2`, parameter `gamma`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """x * gamma, gamma of shape (dim,) initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        """
        Args:
            dim: channel count.
            init_values: initial value of every entry of gamma.
        """
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma  # ... D

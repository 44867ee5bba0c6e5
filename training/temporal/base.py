"""The interface every causal temporal head implements (see training/temporal/heads.py for the contract)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

PROBS = "probs"  # input kinds: per-frame probabilities or the pre-logit features
FEATURES = "features"


class TemporalHead(nn.Module, ABC):
    """Base of the temporal heads (see the module docstring for the interface)."""

    method: str
    input_kind: str  # FEATURES | PROBS

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.num_classes = int(num_classes)

    @property
    @abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Per-stream state shape, without the batch dim."""

    @property
    @abstractmethod
    def receptive_field_frames(self) -> int:
        """Steps of context the head can use."""

    def init_state(self, batch: int) -> Tensor:
        """The fresh-stream state: zeros, N *state_shape."""
        return torch.zeros(batch, *self.state_shape)

    @abstractmethod
    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step: x (N D), state (N *state_shape) -> probabilities (N K), next state."""

    def forward(self, x: Tensor) -> Tensor:
        """N T D inputs -> N T K probabilities, causally from a fresh state (a loop over `step`)."""
        state = self.init_state(x.shape[0]).to(x)
        out = []
        for t in range(x.shape[1]):
            probs, state = self.step(x[:, t], state)
            out.append(probs)
        return torch.stack(out, dim=1)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments (with `method`), enough for `build_head` to rebuild the head."""

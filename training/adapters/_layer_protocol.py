"""What an adapter variant may use of the layer it lives in, as a Protocol.

The variants (`variants.py`, `ta_lora.py`) are strategies the layer (`layer.py`) calls; typing them against this small
surface instead of the concrete `AdapterLinear` keeps the arrows one way: layer -> variants -> this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor, nn


class AdaptedLayer(Protocol):
    """The adapter layer as its variants see it (`AdapterLinear` implements it)."""

    base_layer: nn.Linear
    tasks: Sequence[str]
    row_slices: list[tuple[int, int]]
    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    r: dict[str, int | tuple[int, ...]]
    scaling: dict[str, float]

    @property
    def in_features(self) -> int: ...

    def add_adapter(self, name: str, *, rank: int, alpha: float) -> None: ...

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None: ...

    def __getattr__(self, name: str) -> Tensor: ...  # variant-owned parameters, e.g. TA-LoRA's ta_lora_G / ta_lora_U

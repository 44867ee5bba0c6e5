"""Adapter variants: how one kind of low-rank adapter is created and applied inside `AdapterLinear`.

Variants, picked by rank (a strategy object each, after peft's `LoraVariant` / `lora/variants.py` idea, so the
layer itself holds no `if` per adapter kind):

- `SharedLoraVariant`: one LoRA pair (B A) used by every task stream, eq. 2-3 of EndoARSS (Huang et al., 2025,
  shared/papers/endoarss.md III-C): h = W0 x + B A x.
- `TeslaVariant`: TESLA (III-D, eq. 5-6): one low-rank pair per task, applied to that task's own stream only. The
  streams arrive stacked task-major on the batch axis, so all tasks are computed in ONE batched matmul over the
  stacked per-task factors (the grouped computation of eq. 6) instead of a Python loop of per-task forwards. Each
  task's factors only see its own rows of the batch, so gradients are separated by task id by construction
  ("explicit gradient separation").
- `TaskAwareLoraVariant` (in `ta_lora.py`): TA-LoRA, one Tucker-factored update tensor shared by all tasks whose slice
  t is task t's update (shared/papers/ta-lora-sam.md §3.2); per task like TESLA, merged the same way.

Factor layout (both LoRA variants): an adapter on S output row slices of size o (e.g. q and v of a fused qkv: S=2,
o=D) keeps A as (S*r, in) so that one matmul projects the input for every slice, and B as (S, o, r), applied per slice
with one einsum. Merging and unmerging are generic in the layer (W + delta), since they only need `delta`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from training.adapters._layer_protocol import AdaptedLayer

SHARED_ADAPTER = "shared"


class AdapterVariant:
    """Strategy interface; subclasses override `adapter_names`, `adapter_for` and `forward`."""

    per_task: ClassVar[bool] = False

    @classmethod
    def init(cls, layer: AdaptedLayer, tasks: Sequence[str], rank: Any, alpha: float) -> None:
        """Register this variant's factors on `layer` (A kaiming-uniform, B zeros: the adapter starts as a no-op).

        Args:
            layer: the adapter layer to register on.
            tasks: the layer's tasks.
            rank: the variant's size: an int rank for LoRA / TESLA, (R1, R2, R3) for TA-LoRA.
            alpha: scaling numerator (LoRA / TESLA add alpha / rank * B A; TA-LoRA uses it as its scaling).
        """
        for name in cls.adapter_names(tasks):
            layer.add_adapter(name, rank=rank, alpha=alpha)

    @staticmethod
    def adapter_names(tasks: Sequence[str]) -> tuple[str, ...]:
        """Names of the adapters this variant owns for a layer serving `tasks`."""
        raise NotImplementedError("AdapterVariant subclasses must define adapter_names")

    @staticmethod
    def adapter_for(task: str) -> str:
        """Name of the adapter that serves `task`."""
        raise NotImplementedError("AdapterVariant subclasses must define adapter_for")

    @staticmethod
    def forward(layer: AdaptedLayer, x: Tensor, tasks: Sequence[str]) -> Tensor:
        """Scaled adapter output per slice, M S o, for task-major input rows M in."""
        raise NotImplementedError("AdapterVariant subclasses must define forward")

    @classmethod
    def delta(cls, layer: AdaptedLayer, task: str, dtype: torch.dtype) -> Tensor:
        """Scaled weight update of `task` per slice, S o in, computed in `dtype`."""
        name = cls.adapter_for(task)
        lora_a, lora_b = layer.lora_A[name].to(dtype), layer.lora_B[name].to(dtype)  # S*r in, S o r
        slices, _, rank = lora_b.shape
        per_slice = lora_a.reshape(slices, rank, -1)  # S r in
        return torch.einsum("sor,sri->soi", lora_b, per_slice) * layer.scaling[name]


class SharedLoraVariant(AdapterVariant):
    """LoRA shared by all task streams (EndoARSS eq. 2-3)."""

    @staticmethod
    def adapter_names(tasks: Sequence[str]) -> tuple[str, ...]:
        return (SHARED_ADAPTER,)

    @staticmethod
    def adapter_for(task: str) -> str:
        return SHARED_ADAPTER

    @staticmethod
    def forward(layer: AdaptedLayer, x: Tensor, tasks: Sequence[str]) -> Tensor:
        lora_a, lora_b = layer.lora_A[SHARED_ADAPTER], layer.lora_B[SHARED_ADAPTER]  # S*r in, S o r
        slices, _, rank = lora_b.shape
        hidden = F.linear(x, lora_a).reshape(-1, slices, rank)  # M S r
        return torch.einsum("msr,sor->mso", hidden, lora_b) * layer.scaling[SHARED_ADAPTER]  # M S o


class TeslaVariant(AdapterVariant):
    """TESLA per-task low-rank adapters (EndoARSS eq. 5-6), one batched computation over all task streams."""

    per_task: ClassVar[bool] = True

    @staticmethod
    def adapter_names(tasks: Sequence[str]) -> tuple[str, ...]:
        return tuple(tasks)

    @staticmethod
    def adapter_for(task: str) -> str:
        return task

    @staticmethod
    def forward(layer: AdaptedLayer, x: Tensor, tasks: Sequence[str]) -> Tensor:
        # Stacking the per-task Parameters keeps one Parameter per task (its own state-dict key and optimizer state)
        # while the computation is a single bmm; the stack's backward routes each task's rows to its own factors.
        lora_a = torch.stack([layer.lora_A[task] for task in tasks])  # T S*r in
        lora_b = torch.stack([layer.lora_B[task] for task in tasks])  # T S o r
        streams, slices, _, rank = lora_b.shape
        per_task = x.reshape(streams, -1, x.shape[-1])  # T (B N) in
        hidden = torch.bmm(per_task, lora_a.transpose(1, 2)).reshape(streams, -1, slices, rank)  # T (B N) S r
        out = torch.einsum("tmsr,tsor->tmso", hidden, lora_b)  # T (B N) S o
        # All tasks share one rank and alpha (one `task_rank` per config), hence one scaling.
        return out.reshape(-1, slices, out.shape[-1]) * layer.scaling[tasks[0]]  # M S o

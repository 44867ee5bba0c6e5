"""TA-LoRA: one Tucker-decomposed update tensor per adapted layer, shared by all tasks, sliced per task.

Wang, Ye and Zhang, "Task-Aware Low-Rank Adaptation of Segment Anything Model" (shared/papers/ta-lora-sam.md §3.2,
eq. 2-6; public code XuehaoWangFi/MTSAM; our reading in shared/MODEL_NOTES.md §3). For a frozen linear map with d
inputs, k adapted outputs and T tasks, the per-task updates form a tensor dW (d x k x T) with a Tucker decomposition

    dW = G x1 U1 x2 U2 x3 U3,    G: R1 x R2 x R3 (zeros),  U1: d x R1,  U2: k x R2,  U3: T x R3 (all N(0, 1))

so U1 and U2 carry what the tasks share, U3 (one row per task) what is task-specific, and dW starts at zero. Task t
runs W + s * dW[:, :, t]^T (nn.Linear's (out, in) layout), s = `scaling`; its update matrix is
U2 G_t^T U1^T with the task core G_t = G x3 U3[t] (R1 x R2). Parameters: R1 R2 R3 + d R1 + k R2 + T R3, i.e. one task
more costs R3 numbers where T independent LoRAs of rank r cost r (d + k) (`parameter_growth`).

In this code base TA-LoRA is a third adapter variant (strategy object, next to `SharedLoraVariant` and `TeslaVariant`
in `variants.py`) inside `AdapterLinear`, so it keeps the layer's contract: `delta_weight(task)`, `merge`,
`unmerge`, task-major stacked streams (`set_active_tasks`), and `merge_and_unload` folding it into per-task stacked
weights. The factors are plain parameters of the layer, `ta_lora_G`, `ta_lora_U1`, `ta_lora_U2`, `ta_lora_U3` (one
set for all tasks, hence no per-task ParameterDict). With row slices (e.g. q and v of a fused qkv) the adapted rows
are taken together, k = slices x slice size.

Orthogonal regulariser (`orthogonal_regularization`), weighted by lambda (1) and added once per step; U3 is not
regularised. Two forms of the gaps ||U1^T U1 - I||_F, ||U2^T U2 - I||_F and ||G_v^T G_v - I||_F (every slice v):
- "squared" (default): the paper's eq. 5, the sum of the squared norms per layer, averaged over layers (so lambda
  does not scale with depth);
- "norm": the public code's, as MODEL_NOTES §3 records it: the mean of the unsquared norms over slices and layers.
The squared form is large at the paper's own N(0,1) factor init: ||U1^T U1 - I||_F^2 is about R1 d^2 (3e5 on
`tiny_msam`, over 1e7 per layer for SAM ViT-B with R1 = 32), and on `tiny_msam` its pull on the core slices slowed
learning (validation accuracy / mIoU 0.38 / 0.32 against 0.42 / 0.42 with "norm" after 4 of 16 epochs). We follow the
paper by default and keep the code's form as an option (`adapters.orth_penalty: norm`). Either way the trainer adds
the regulariser's gradient after any clipping of the task gradients, so a large term cannot scale them down.

Task weights (eq. 6, sum_t w_t L_t / sum_t w_t) are the trainer's `train.weighting: weighted` with
`train.task_weights` (training/engine/weighting.py), which the TA-LoRA configs use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from training.adapters._layer_protocol import AdaptedLayer
from training.adapters.variants import AdapterVariant

TA_LORA_ADAPTER = "ta_lora"
"""Key of TA-LoRA's entry in `AdapterLinear.r` / `.scaling`; not usable as a task name."""

PAPER_RANKS = (32, 32, 8)
"""(R1, R2, R3) = (p, q, v) of the paper's §4.1 on NYUv2 (three tasks); its two-task Cityscapes runs use (16, 16, 4).
The public code's R3 = 4 (MODEL_NOTES §3) is not what the paper reports."""


def check_ranks(ranks: Any) -> tuple[int, int, int]:
    """`ranks` as a tuple of three positive ints (R1, R2, R3).

    Raises:
        ValueError: not three positive integers (quotes the value).
    """
    values = tuple(ranks) if isinstance(ranks, list | tuple) else ()
    if len(values) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in values):
        raise ValueError(f"TA-LoRA ranks {ranks!r} must be three positive integers (R1, R2, R3), e.g. [32, 32, 4]")
    return values  # type: ignore[return-value]


class TaskAwareLoraVariant(AdapterVariant):
    """TA-LoRA inside `AdapterLinear`: a Tucker-factored update tensor; task t uses slice t."""

    per_task: ClassVar[bool] = True
    factor_names: ClassVar[tuple[str, ...]] = ("ta_lora_G", "ta_lora_U1", "ta_lora_U2", "ta_lora_U3")

    @classmethod
    def init(cls, layer: AdaptedLayer, tasks: Sequence[str], rank: Any, alpha: float) -> None:
        """Register G (zeros) and U1, U2, U3 (standard normal) on `layer`: the update starts at exactly zero.

        Args:
            layer: the adapter layer (its base weight gives d, device and dtype; its row slices give k).
            tasks: the layer's tasks; row t of U3 belongs to tasks[t].
            rank: (R1, R2, R3).
            alpha: the scaling s itself (TA-LoRA does not divide by a rank).
        """
        ranks = check_ranks(rank)
        if not alpha > 0:
            raise ValueError(f"TA-LoRA scaling={alpha!r} must be positive (the paper uses 0.5)")
        if TA_LORA_ADAPTER in layer.r:
            raise ValueError(f"adapter name {TA_LORA_ADAPTER!r} is taken on this layer (a task of that name?)")
        weight = layer.base_layer.weight
        r1, r2, r3 = ranks
        shapes = {
            "ta_lora_U1": (layer.in_features, r1),
            "ta_lora_U2": (cls.adapted_rows(layer), r2),
            "ta_lora_U3": (len(tasks), r3),
        }
        layer.ta_lora_G = nn.Parameter(torch.zeros(r1, r2, r3, device=weight.device, dtype=weight.dtype))
        for name, shape in shapes.items():
            # Drawn in fp32 so a half-precision layer gets the same factors, rounded, as its fp32 twin.
            value = torch.randn(shape, device=weight.device).to(weight.dtype)
            layer.register_parameter(name, nn.Parameter(value))
        layer.r[TA_LORA_ADAPTER] = ranks
        layer.scaling[TA_LORA_ADAPTER] = float(alpha)

    @staticmethod
    def adapter_names(tasks: Sequence[str]) -> tuple[str, ...]:
        return (TA_LORA_ADAPTER,)

    @staticmethod
    def adapter_for(task: str) -> str:
        return TA_LORA_ADAPTER

    @staticmethod
    def adapted_rows(layer: AdaptedLayer) -> int:
        """k: the number of output rows the update covers (all row slices together)."""
        return sum(stop - start for start, stop in layer.row_slices)

    @staticmethod
    def task_cores(layer: AdaptedLayer, tasks: Sequence[str], dtype: torch.dtype) -> Tensor:
        """G x3 U3[t] for each task in `tasks`: T R1 R2."""
        u3 = layer.ta_lora_U3.to(dtype)  # T_all R3
        if tuple(tasks) != layer.tasks:
            u3 = u3[[layer.tasks.index(task) for task in tasks]]  # T R3, in stream order
        return torch.einsum("pql,tl->tpq", layer.ta_lora_G.to(dtype), u3)

    @classmethod
    def delta(cls, layer: AdaptedLayer, task: str, dtype: torch.dtype) -> Tensor:
        core = cls.task_cores(layer, (task,), dtype)[0]  # R1 R2
        u1, u2 = layer.ta_lora_U1.to(dtype), layer.ta_lora_U2.to(dtype)  # d R1, k R2
        update = u2 @ core.transpose(0, 1) @ u1.transpose(0, 1)  # k d: slice t of dW, transposed to (out, in)
        update = update * layer.scaling[TA_LORA_ADAPTER]
        return update.reshape(len(layer.row_slices), -1, layer.in_features)  # S o in

    @classmethod
    def forward(cls, layer: AdaptedLayer, x: Tensor, tasks: Sequence[str]) -> Tensor:
        # x U1 is shared by every stream; only the R1 x R2 core differs per task, so the per-task part is one small
        # bmm over the stacked streams, whatever the number of tasks.
        cores = cls.task_cores(layer, tasks, x.dtype)  # T R1 R2
        streams, r1, r2 = cores.shape
        hidden = (x @ layer.ta_lora_U1).reshape(streams, -1, r1)  # T (B N) R1
        hidden = torch.bmm(hidden, cores).reshape(-1, r2)  # M R2
        out = hidden @ layer.ta_lora_U2.transpose(0, 1)  # M k
        return out.reshape(x.shape[0], len(layer.row_slices), -1) * layer.scaling[TA_LORA_ADAPTER]  # M S o


def uses_ta_lora(layer: nn.Module) -> bool:
    """True for an adapter layer that carries TA-LoRA factors."""
    return TaskAwareLoraVariant in getattr(layer, "variants", ())


OrthPenalty = Literal["norm", "squared"]


def _gram_gap(matrices: Tensor, penalty: OrthPenalty) -> Tensor:
    """||M^T M - I||_F (or its square) for M (..., n, r): one value per leading index."""
    gram = matrices.transpose(-2, -1) @ matrices  # ... r r
    gap = gram - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return gap.square().sum(dim=(-2, -1)) if penalty == "squared" else torch.linalg.matrix_norm(gap)


def orthogonality_terms(layer: AdaptedLayer, penalty: OrthPenalty = "squared") -> Tensor:
    """One layer's gaps in fp32: [U1, U2, G_1, ..., G_R3] (2 + R3), as norms or squared norms (`penalty`)."""
    u1, u2, core = (getattr(layer, name).float() for name in ("ta_lora_U1", "ta_lora_U2", "ta_lora_G"))
    slices = core.permute(2, 0, 1)  # R3 R1 R2: G_v = G[:, :, v]
    return torch.cat([_gram_gap(u1, penalty).reshape(1), _gram_gap(u2, penalty).reshape(1), _gram_gap(slices, penalty)])


def orthogonal_regularization(layers: Iterable[AdaptedLayer], penalty: OrthPenalty = "squared") -> Tensor:
    """The regulariser without lambda (module docstring): "norm" the mean of every gap over slices and layers,
    "squared" the per-layer sum of squared gaps (eq. 5) averaged over layers; a zero tensor for no layers."""
    if penalty not in get_args(OrthPenalty):
        raise ValueError(f"orth_penalty={penalty!r} is not one of {list(get_args(OrthPenalty))}")
    terms = [orthogonality_terms(layer, penalty) for layer in layers]
    if not terms:
        return torch.zeros(())
    if penalty == "squared":
        return torch.stack([t.sum() for t in terms]).mean()
    return torch.cat(terms).mean()


def ta_lora_parameter_count(in_features: int, out_features: int, tasks: int, ranks: Sequence[int]) -> int:
    """Factors of one TA-LoRA layer: R1 R2 R3 + d R1 + k R2 + T R3 (paper §3.2, "Parameter Complexity")."""
    r1, r2, r3 = check_ranks(ranks)
    return r1 * r2 * r3 + in_features * r1 + out_features * r2 + tasks * r3


def lora_parameter_count(in_features: int, out_features: int, tasks: int, rank: int) -> int:
    """Factors of T independent rank-r LoRAs on one layer (the paper's LoRA-STL): T r (d + k)."""
    return tasks * rank * (in_features + out_features)


def parameter_growth(
    tasks: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    in_features: int = 384,
    out_features: int = 3 * 384,
    layers: int = 12,
    ranks: Sequence[int] = PAPER_RANKS,
    lora_rank: int = 32,
) -> list[dict[str, int | float]]:
    """Adapter parameters of TA-LoRA vs one LoRA per task as the number of tasks grows.

    Defaults: the fused qkv of every block of DINOv2 ViT-S/14 (d = 384, k = 1152, 12 blocks) at the paper's ranks,
    against per-task LoRAs of rank 32 (= R1 = R2) on the same projections. R3 stays fixed as T grows.

    Returns:
        One row per entry of `tasks`: {"tasks", "ta_lora", "lora", "ratio"} (ratio = ta_lora / lora).
    """
    rows: list[dict[str, int | float]] = []
    for count in tasks:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"task counts {list(tasks)} must be positive integers")
        ta_lora = layers * ta_lora_parameter_count(in_features, out_features, count, ranks)
        lora = layers * lora_parameter_count(in_features, out_features, count, lora_rank)
        rows.append({"tasks": count, "ta_lora": ta_lora, "lora": lora, "ratio": ta_lora / lora})
    return rows

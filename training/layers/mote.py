"""Mixture of Task Experts (MoTE): cross-task fusion of the multi-stage BDTA features, one output map per task.

Paper: Yao et al., "Parameter-, Memory-, Time-Efficient Multi-Task Dense Vision Adaptation" (AAAI 2026;
shared/papers/bdta-mote.md, section 3.3, eq. 9-11, Fig. 2c). Every task's adapted features at every stage are one
"expert". Per stage i and task t:

    A'_t,i = Resize(A_t,i W_t,i)                                  eq. 9, SegFormer-style reduce to width C_1
    g_t,i  = Softmax(h + N(0, 1) Softplus(e))                     eq. 10, noisy gating (Shazeer et al. 2017)
             h = pool(MLP_gate(F_i)), e = pool(MLP_noise(F_i))    router input: the frozen features F_i
    R_t,i  = A'_t,i + gamma_t,i * sum_q g_t,i(q) A'_q,i           eq. 11, gamma zero-initialised
    R_t    = Concat_i(R_t,i) W_t                                  stage fusion

Because gamma starts at zero, MoTE starts as the identity on each task's own experts: R_t,i = A'_t,i, so no task
sees another task's features and the routers receive exactly zero gradient until gamma moves away from zero (the
paper: each task first learns its own "basis representation"). Noise is added in training only; an inference copy
drops the noise MLPs (`drop_noise`). Gates are per image: the router MLP runs on every token, then tokens are
averaged (for a linear last layer the order of MLP and pooling only matters through the activation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.layers.mlp import Mlp


class TaskRouter(nn.Module):
    """Two-layer MLP on tokens, averaged per image, plus optional learned noise: B L C -> B K gate probabilities."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden_dim: int,
        *,
        noisy: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
            dim: token width C of the router input.
            num_experts: K, one gate per task expert.
            hidden_dim: hidden width of the gate and noise MLPs.
            noisy: learn the noise scale (eq. 10); the noise is still only drawn in training mode.
            act_layer: MLP activation.
        """
        super().__init__()
        self.gate = Mlp(dim, hidden_dim, num_experts, act_layer=act_layer)
        self.noise = Mlp(dim, hidden_dim, num_experts, act_layer=act_layer) if noisy else None

    def forward(self, x: Tensor) -> Tensor:
        logits = self.gate(x).mean(dim=1)  # B L C -> B K
        if self.training and self.noise is not None:
            scale = F.softplus(self.noise(x).mean(dim=1))  # B K
            logits = logits + torch.randn_like(logits) * scale
        return logits.softmax(dim=-1)  # B K


def _resize_tokens(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """B (h w) C on `grid` -> B (H W) C on `size` (bilinear); unchanged when the grids agree (plain ViTs)."""
    if tuple(grid) == tuple(size):
        return tokens
    batch, _, dim = tokens.shape
    maps = tokens.transpose(1, 2).reshape(batch, dim, *grid)  # B C h w
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)  # B C H W
    return maps.flatten(2).transpose(1, 2)  # B (H W) C


class MoTE(nn.Module):
    """Per-stage task experts (T B L_i C_i) + frozen stage features -> one fused B L_1 D token map per task."""

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        tasks: Sequence[str],
        *,
        router_hidden_dim: int,
        noisy_gating: bool = True,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        """
        Args:
            in_dims: token width C_i of each stage (experts and frozen features share it).
            out_dim: D, the width every expert is reduced to (the paper's C_1) and the output width.
            tasks: task names; the expert axis of the gates follows this order.
            router_hidden_dim: hidden width of the router MLPs.
            noisy_gating: learned router noise in training (eq. 10).
            act_layer: activation of the router MLPs.
        """
        super().__init__()
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"MoTE needs distinct task names, got {list(tasks)}")
        if not in_dims:
            raise ValueError("MoTE needs at least one stage")
        self.tasks = tasks
        self.num_stages = len(in_dims)
        self.out_dim = out_dim
        self.reduce = nn.ModuleDict({t: nn.ModuleList(nn.Linear(c, out_dim) for c in in_dims) for t in tasks})
        self.router = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    TaskRouter(c, len(tasks), router_hidden_dim, noisy=noisy_gating, act_layer=act_layer)
                    for c in in_dims
                )
                for t in tasks
            }
        )
        # gamma_t,i in R^D, zero-initialised (eq. 11): starts without cross-task mixing.
        self.gamma = nn.ParameterDict({t: nn.Parameter(torch.zeros(len(in_dims), out_dim)) for t in tasks})
        self.fuse = nn.ModuleDict({t: nn.Linear(len(in_dims) * out_dim, out_dim) for t in tasks})

    def drop_noise(self) -> None:
        """Remove the routers' noise MLPs (inference form: no training-only weights left), in place."""
        for routers in self.router.values():
            for router in routers:
                router.noise = None

    def forward(
        self,
        experts: Sequence[Tensor],
        general: Sequence[Tensor],
        grids: Sequence[tuple[int, int]],
        tasks: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """
        Args:
            experts: per stage, the adapted features of ALL tasks, T B L_i C_i in `self.tasks` order.
            general: per stage, the frozen backbone features B L_i C_i (router input).
            grids: per stage, the token grid (h_i, w_i); every expert is resized to the first stage's grid.
            tasks: the tasks to return (default all); every task's experts still take part in the mixtures.

        Returns:
            Task name -> fused features, B L_1 D.
        """
        if not len(experts) == len(general) == len(grids) == self.num_stages:
            raise ValueError(f"MoTE was built for {self.num_stages} stages, got {len(experts)} expert sets")
        tasks = self.tasks if tasks is None else tuple(tasks)
        size = tuple(grids[0])
        # eq. 9: reduce + resize every expert once; reduced[i] is T B L_1 D.
        reduced = [
            torch.stack([_resize_tokens(self.reduce[t][i](stage[k]), grids[i], size) for k, t in enumerate(self.tasks)])
            for i, stage in enumerate(experts)
        ]
        out: dict[str, Tensor] = {}
        for task in tasks:
            k = self.tasks.index(task)
            mixed = []
            for i in range(self.num_stages):
                gates = self.router[task][i](general[i])  # B T
                fused = torch.einsum("bq,qbld->bld", gates, reduced[i])  # B L_1 D: sum_q g(q) A'_q
                mixed.append(reduced[i][k] + self.gamma[task][i] * fused)  # eq. 11
            out[task] = self.fuse[task](torch.cat(mixed, dim=-1))  # B L_1 (N D) -> B L_1 D
        return out

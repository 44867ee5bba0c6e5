"""Data-parallel training under `torchrun` (gloo on CPU, nccl on GPU).

Gradients are averaged with explicit all-reduces after the loss weighting has run, instead of wrapping the model
in DistributedDataParallel: DB-MTL computes per-task gradients with `torch.autograd.grad` and then writes the
combined shared gradient itself, which DDP's backward hooks would neither see nor synchronise. One coalesced
all-reduce per step keeps the cost at one message per step.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size <= 1:
        return DistributedContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    logger.info("rank %d/%d joined the %s process group", rank, world_size, backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def _coalesced_mean(tensors: Sequence[Tensor], world_size: int) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def average_gradients(params: Iterable[nn.Parameter], ctx: DistributedContext) -> None:
    """Mean of every gradient across ranks (parameters without a gradient get zeros, so all ranks agree)."""
    if not ctx.enabled:
        return
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    _coalesced_mean(grads, ctx.world_size)


def average_tensors(tensors: Sequence[Tensor], ctx: DistributedContext) -> None:
    """In-place cross-rank mean (used for DB-MTL's per-task gradients before their EMA)."""
    if ctx.enabled:
        _coalesced_mean(list(tensors), ctx.world_size)


def broadcast_module(module: nn.Module, ctx: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start, whatever the seeds)."""
    if not ctx.enabled:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_buffers(module: nn.Module, ctx: DistributedContext) -> None:
    """Average floating-point buffers (BatchNorm running stats) so every rank holds the same model."""
    if not ctx.enabled:
        return
    floats = [b for b in module.buffers() if b.is_floating_point()]
    _coalesced_mean(floats, ctx.world_size)


def all_reduce_sum(values: Tensor, ctx: DistributedContext) -> Tensor:
    if ctx.enabled:
        dist.all_reduce(values)
    return values


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()

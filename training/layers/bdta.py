"""Bi-Directional Task Adaptation (BDTA): one stage of the task bypass branch beside a frozen backbone.

Paper: Yao et al., "Parameter-, Memory-, Time-Efficient Multi-Task Dense Vision Adaptation" (AAAI 2026;
shared/papers/bdta-mote.md, section 3.2, eq. 3-8, Fig. 2b). No public code exists; this follows the equations
(shared/MODEL_NOTES.md §4). For stage i with frozen features F (B L C) and the previous stage's per-task features
A_t (B L C), everything at width d = C / r:

    F^ = down_general(F),  A^_t = down_task(A_t)                                  input projections
    G2T (eq. 4-5): F_g2t,t = F^ + up(GELU(down(F^)))                              per-task bottleneck
                   A~_t = A^_t + Attn(LN(A^_t), LN(F_g2t,t));  A_g2t,t = A~_t + FFN(LN(A~_t))
    T2G (eq. 6-7): A_t2g,t = A_g2t,t + up(GELU(down(A_g2t,t)))                    per-task bottleneck
                   F~ = F^ + Attn(LN(F^), LN([A_t2g,1 ... A_t2g,T]));  F_t2g = F~ + FFN(LN(F~))
    eq. 8:         A_t <- up_proj(A_g2t,t + F_t2g)                                back to width C

Reading of the paper where it leaves room, and why:
- G2T attends from the task features (queries) to that task's adapted general features (keys/values); T2G attends
  from the general features (queries) to the T2G-adapted task features of ALL tasks at once (their tokens
  concatenated), giving ONE task-general F_t2g that eq. 8 adds to every task (eq. 7-8 carry no task index on F_t2g;
  section 4.4: "T2G shares features across tasks"). So only the two bottlenecks are per task; projections,
  cross-attentions and FFNs are shared ("only the bi-directional adapter components scale with the number of tasks").
- Attention is dense multi-head attention. The paper uses ViT-Adapter's sparse (deformable) attention on Swin
  feature pyramids; on a plain ViT's single token grid (16 x 16 at 224 px, patch 14) dense attention is cheap, exact
  and exports to ONNX as plain MatMul/Softmax.
- The per-task bottlenecks are called `*_bottleneck`, not "adapter": export checks flag any weight named like a
  LoRA/adapter factor that should have been folded, and these are ordinary inference weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.layers.export_mode import is_exportable
from training.layers.mlp import Mlp


class CrossAttention(nn.Module):
    """Multi-head attention from query tokens to context tokens: B Nq D, B Nk D -> B Nq D."""

    def __init__(self, dim: int, num_heads: int = 4, *, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        """
        Args:
            dim: token width D of queries and context.
            num_heads: heads; must divide `dim`.
            qkv_bias: learn biases in the q and kv projections.
            proj_bias: learn a bias in the output projection.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # rows: k, then v
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        batch, queries, dim = query.shape  # B Nq D
        keys = context.shape[1]
        q = self.q(query).reshape(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)  # B h Nq d
        kv = self.kv(context).reshape(batch, keys, 2, self.num_heads, self.head_dim)  # B Nk 2 h d
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B h Nk d)
        if is_exportable():  # explicit product: traceable by every exporter (see training.layers.export_mode)
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # B h Nq d
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # B h Nq d
        return self.proj(out.transpose(1, 2).reshape(batch, queries, dim))  # B Nq D


class Bottleneck(nn.Module):
    """Residual bottleneck x + up(act(down(x))) (eq. 4 and 6): the per-task part of BDTA."""

    def __init__(self, dim: int, hidden_dim: int, *, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        """
        Args:
            dim: token width.
            hidden_dim: bottleneck width.
            act_layer: activation between the projections (GELU in the paper).
        """
        super().__init__()
        self.down = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.up = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))  # ... D


class Injection(nn.Module):
    """x + Attn(LN(x), LN(context)), then + FFN(LN(.)) (eq. 5 and 7): inject `context` into the query tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        ffn_ratio: float = 2.0,
        *,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        """
        Args:
            dim: token width of queries and context.
            num_heads: cross-attention heads.
            ffn_ratio: FFN hidden width as a multiple of `dim`.
            act_layer: FFN activation.
            norm_layer: normalisation factory called with `dim`.
        """
        super().__init__()
        self.norm_query = norm_layer(dim)
        self.norm_context = norm_layer(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm_ffn = norm_layer(dim)
        self.ffn = Mlp(dim, max(1, round(dim * ffn_ratio)), act_layer=act_layer)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn(self.norm_query(x), self.norm_context(context))  # B Nq D
        return x + self.ffn(self.norm_ffn(x))  # B Nq D


class BDTA(nn.Module):
    """One BDTA stage: (frozen features B L C, per-task features T B L C) -> new per-task features T B L C."""

    def __init__(
        self,
        dim: int,
        tasks: Sequence[str],
        *,
        reduction: int = 4,
        num_heads: int = 4,
        ffn_ratio: float = 2.0,
        bottleneck_ratio: float = 0.25,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        """
        Args:
            dim: backbone token width C (input and output width of the stage).
            tasks: task names; the order is the order of the task axis T of the inputs and outputs.
            reduction: r, the stage works at width C / r (paper default 4).
            num_heads: cross-attention heads at width C / r.
            ffn_ratio: FFN hidden width after each cross-attention, as a multiple of C / r.
            bottleneck_ratio: hidden width of the per-task G2T / T2G bottlenecks, as a multiple of C / r.
            act_layer: activation of the bottlenecks and FFNs.
            norm_layer: normalisation factory called with the reduced width.
        """
        super().__init__()
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"BDTA needs distinct task names, got {list(tasks)}")
        if reduction < 1 or dim % reduction:
            raise ValueError(f"BDTA reduction {reduction} must be a positive divisor of the token width {dim}")
        hidden = dim // reduction
        bottleneck = max(1, round(hidden * bottleneck_ratio))
        self.tasks = tasks
        self.dim, self.hidden_dim = dim, hidden
        self.down_general = nn.Linear(dim, hidden)
        self.down_task = nn.Linear(dim, hidden)
        self.g2t_bottleneck = nn.ModuleDict({t: Bottleneck(hidden, bottleneck, act_layer=act_layer) for t in tasks})
        self.g2t = Injection(hidden, num_heads, ffn_ratio, act_layer=act_layer, norm_layer=norm_layer)
        self.t2g_bottleneck = nn.ModuleDict({t: Bottleneck(hidden, bottleneck, act_layer=act_layer) for t in tasks})
        self.t2g = Injection(hidden, num_heads, ffn_ratio, act_layer=act_layer, norm_layer=norm_layer)
        self.up = nn.Linear(hidden, dim)

    def forward(self, general: Tensor, task_features: Tensor) -> Tensor:
        """
        Args:
            general: frozen backbone features F of this stage, B L C (detached).
            task_features: adapted features A of the previous stage, T B L C in `self.tasks` order.

        Returns:
            This stage's adapted features, T B L C.
        """
        num_tasks, batch, length, _ = task_features.shape
        general = self.down_general(general)  # B L d
        tasks = self.down_task(task_features).flatten(0, 1)  # (T B) L d
        # G2T: each task reads the general features through its own bottleneck.
        adapted_general = torch.cat([self.g2t_bottleneck[t](general) for t in self.tasks])  # (T B) L d
        g2t = self.g2t(tasks, adapted_general)  # (T B) L d
        # T2G: the general features read every task's T2G-adapted features at once.
        per_task = g2t.reshape(num_tasks, batch, length, -1)  # T B L d
        t2g_context = torch.stack([self.t2g_bottleneck[t](per_task[i]) for i, t in enumerate(self.tasks)])
        t2g_context = t2g_context.transpose(0, 1).reshape(batch, num_tasks * length, -1)  # B (T L) d
        t2g = self.t2g(general, t2g_context)  # B L d
        return self.up(per_task + t2g.unsqueeze(0))  # T B L C

"""Attention over a 2-D token grid with decomposed relative position bias, and the window helpers around it.

Windowed attention with a list of global blocks is the ViTDet backbone (Li et al., "Exploring Plain Vision Transformer
Backbones for Object Detection", ECCV 2022) that SAM's image encoder uses (Kirillov et al., "Segment Anything", ICCV
2023; `segment_anything/modeling/image_encoder.py`). The decomposed relative position bias is MViTv2's (Li et al.,
CVPR 2022, eq. 4): for a query at (i, j) and a key at (k, l) the logit gets q . R_h[i - k] + q . R_w[j - l], with
one learned table per axis of 2 * size - 1 rows. The query enters the bias *unscaled*, as in SAM.

Windows are cut after zero-padding the grid to a multiple of the window size; padded tokens take part in the
attention of their window as keys (no mask), exactly as SAM and ViTDet do, so checkpoints are reproduced.

The attention product uses `F.scaled_dot_product_attention` with the bias as an additive mask unless
`training.layers.export_mode.exportable()` is active, then the explicit softmax(QK^T * scale + bias) V. `qkv` and
`proj` are called as modules (rows of qkv: q, then k, then v), so adapter wrappers can replace them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.layers.export_mode import is_exportable


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Cut a token grid into non-overlapping windows, zero-padding the bottom and right edges first.

    Args:
        x: B H W C tokens.
        window_size: window side w.

    Returns:
        (B * nH * nW) w w C windows (row-major over windows) and the padded size (Hp, Wp).
    """
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.reshape(batch, padded_h // window_size, window_size, padded_w // window_size, window_size, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)  # (B nH nW) w w C
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: Tensor, window_size: int, padded_size: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """Inverse of `window_partition`: reassemble the grid and drop the padding.

    Args:
        windows: (B * nH * nW) w w C windows.
        window_size: window side w.
        padded_size: (Hp, Wp) returned by `window_partition`.
        size: (H, W) before padding.

    Returns:
        B H W C tokens.
    """
    padded_h, padded_w = padded_size
    height, width = size
    rows, cols = padded_h // window_size, padded_w // window_size
    batch = windows.shape[0] // (rows * cols)
    x = windows.reshape(batch, rows, cols, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)  # B Hp Wp C
    if padded_h != height or padded_w != width:
        x = x[:, :height, :width]
    return x.contiguous()


def resample_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Resize a relative-position table to `length` rows by linear interpolation (SAM `get_rel_pos`).

    Computed in float32 and returned in the input dtype; the table itself when the length already matches.

    Args:
        rel_pos: L C table, row r = offset r - (L - 1) / 2.
        length: target number of rows (2 * size - 1).
    """
    if rel_pos.shape[0] == length:
        return rel_pos
    table = rel_pos.float().T.unsqueeze(0)  # 1 C L
    table = F.interpolate(table, size=length, mode="linear")  # 1 C length
    return table[0].T.to(rel_pos.dtype)


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Embeddings of every (query, key) offset along one axis: q_size k_size C.

    When the query and key lengths differ the shorter axis is stretched to the longer one (SAM / MViTv2); the table is
    resampled when it was learned for another length.
    """
    table = resample_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[relative.long()]


def decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, q_size: tuple[int, int], k_size: tuple[int, int]
) -> Tensor:
    """Additive attention bias q . R_h[i - k] + q . R_w[j - l] (MViTv2 eq. 4).

    Args:
        q: N (qh * qw) C queries (N = batch x heads), unscaled.
        rel_pos_h: table of the height axis.
        rel_pos_w: table of the width axis.
        q_size: query grid (qh, qw).
        k_size: key grid (kh, kw).

    Returns:
        N (qh * qw) (kh * kw) bias.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    table_h = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)  # qh kh C
    table_w = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)  # qw kw C
    grid_q = q.reshape(q.shape[0], q_h, q_w, q.shape[-1])  # N qh qw C
    rel_h = torch.einsum("nhwc,hkc->nhwk", grid_q, table_h)  # N qh qw kh
    rel_w = torch.einsum("nhwc,wkc->nhwk", grid_q, table_w)  # N qh qw kw
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # N qh qw kh kw
    return bias.reshape(q.shape[0], q_h * q_w, k_h * k_w)


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a B H W C grid, with optional decomposed relative position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        """
        Args:
            dim: token width D.
            num_heads: number of heads; must divide `dim`.
            qkv_bias: learn a bias for the fused qkv projection.
            proj_bias: learn a bias for the output projection.
            use_rel_pos: add the decomposed relative position bias.
            input_size: grid (rows, cols) the tables are learned for: the window for windowed blocks, the token grid
                at the training resolution for global ones. Other grids resample the tables linearly.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size (rows, cols) is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape  # B H W D
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # B N 3 h d
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B h N d)
        bias = None
        if self.use_rel_pos:
            flat_q = q.reshape(batch * self.num_heads, tokens, self.head_dim)  # (B h) N d
            bias = decomposed_rel_pos_bias(flat_q, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
            bias = bias.reshape(batch, self.num_heads, tokens, tokens)  # B h N N
        if is_exportable():
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B h N N
            if bias is not None:
                attn = attn + bias
            out = attn.softmax(dim=-1) @ v  # B h N d
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # B h N d
        out = out.transpose(1, 2).reshape(batch, height, width, dim)  # B H W D
        return self.proj(out)

"""Spatially-aware Multi-scale Attention (SMA), applied to the image before the patch embedding.

Paper: Huang et al., "EndoARSS" (shared/papers/endoarss.md, section III-B, Fig. 3a):

    x_o (B C H W) -> n x n conv -> 1 x 1 conv to d channels = x_l
      -> unfold into N = HW / P non-overlapping h x w patches: x_u in R^{P x N x d}
      -> x_d(p) = A(x_u(p)) for every within-patch position p (eq. 1)
      -> fold back to x_f (B d H W) -> 1 x 1 conv d -> C -> concat with x_o -> n x n fusion conv (2C -> C)

The unfold / fold is MobileViT's (Mehta & Rastegari, ICLR 2022, the paper's [60]): for a fixed position p inside
the patch, the N patches form an (H/h x W/w) grid, so A sees a d-channel map of that grid and every output pixel mixes
information from the whole image (receptive field H x W). We lay the P positions on the batch axis,
(B P) d H/h W/w, so A is one batched call.

A is the "efficient multi-scale attention" (EMA) of Ouyang et al., "Efficient Multi-Scale Attention Module with
Cross-Spatial Learning", ICASSP 2023 (the paper's [61]): channels split into groups; a 1x1 branch gates each group
with sigmoid(1D average pools along height and along width, mixed by one shared 1x1 conv) followed by GroupNorm; a
parallel 3x3 branch; cross-spatial learning multiplies each branch's softmax-ed 2D-pooled channel descriptor with the
other branch's map, sums both, and the sigmoid of that spatial map reweights the grouped input.

How ours differs from the public EndoARSS code (shared/MODEL_NOTES.md §1), and why: that code expands to d = 512,
unfolds 7 x 7 patches and feeds EMA a (B, 49, 1024, 512) tensor, i.e. the 49 patch pixels act as EMA channels and
the (N, d) = (1024, 512) plane as its "image"; and a freezing rule keeps SMA at its random initialisation. We follow
the paper: P is a batch axis, d the channels and the N-patch grid the spatial plane (eq. 1 applies A per p), with a
small d (16) and 2 x 2 patches (the paper asks for h, w <= n), so the largest tensor is the size of x_l (B d H W;
0.8 million elements per 224-px image against the public code's 25.7 million). SMA is trainable and starts as the
identity (the fusion conv passes the image through and ignores the attention half), so the pretrained backbone first
sees the real image and SMA departs from the identity only as far as training asks. The paper lists plain
convolutions, so we add no norms or activations (MobileViT's conv-BN-SiLU would also break the exact identity at
initialisation).

Inputs of any size work: x_l is padded (reflect) to a multiple of the patch size and the folded map is cropped back.
The forward has no data-dependent Python control flow, so it traces for ONNX export: with a dynamic batch at any fixed
image size, and with dynamic height and width when those are declared multiples of the patch size (`2 * Dim(...)`);
for arbitrary symbolic sizes torch.export cannot prove reflect padding's "pad < size" and asks for that form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unfold_patches(x: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """B d H W -> (B P) d H/h W/w: one map of the patch grid per within-patch position p = i * w + j.

    Entry [b * P + p, :, r, c] is x[b, :, r * h + i, c * w + j]. H and W must be multiples of (h, w).
    """
    batch, dim, height, width = x.shape
    ph, pw = patch_size
    x = x.reshape(batch, dim, height // ph, ph, width // pw, pw)  # B d Hn h Wn w
    x = x.permute(0, 3, 5, 1, 2, 4)  # B h w d Hn Wn
    return x.reshape(batch * ph * pw, dim, height // ph, width // pw)  # (B P) d Hn Wn


def fold_patches(x: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B P) d Hn Wn -> B d (Hn h) (Wn w); the inverse of `unfold_patches`."""
    _, dim, grid_h, grid_w = x.shape
    ph, pw = patch_size
    x = x.reshape(-1, ph, pw, dim, grid_h, grid_w)  # B h w d Hn Wn
    x = x.permute(0, 3, 4, 1, 5, 2)  # B d Hn h Wn w
    return x.reshape(-1, dim, grid_h * ph, grid_w * pw)  # B d H W


class EfficientMultiScaleAttention(nn.Module):
    """EMA (Ouyang et al. 2023): grouped channel gating + 3x3 context, reweighted by cross-spatial attention.

    The output has the input's shape: B C H W -> B C H W.
    """

    def __init__(self, channels: int, groups: int = 4) -> None:
        """
        Args:
            channels: input channels C; must be divisible by `groups`.
            groups: channel groups G; each group is attended independently, with weights shared by all groups.
        """
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"EMA channels {channels} must be divisible by groups {groups}; choose groups | channels")
        self.groups = groups
        group_channels = channels // groups
        self.conv1x1 = nn.Conv2d(group_channels, group_channels, kernel_size=1)
        self.conv3x3 = nn.Conv2d(group_channels, group_channels, kernel_size=3, padding=1)
        # One normalisation group per channel, as in EMA: each channel is standardised over its spatial plane.
        self.norm = nn.GroupNorm(group_channels, group_channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        grouped = x.reshape(batch * self.groups, channels // self.groups, height, width)  # (B G) c H W
        # 1x1 branch: directional 1D average pools, one shared 1x1 conv over their concatenation, sigmoid gates.
        pool_h = grouped.mean(dim=3, keepdim=True)  # (B G) c H 1
        pool_w = grouped.mean(dim=2, keepdim=True).transpose(2, 3)  # (B G) c W 1
        gates = self.conv1x1(torch.cat([pool_h, pool_w], dim=2))  # (B G) c (H+W) 1
        gate_h, gate_w = gates.split([height, width], dim=2)
        local = self.norm(grouped * gate_h.sigmoid() * gate_w.transpose(2, 3).sigmoid())  # (B G) c H W
        # 3x3 branch: multi-scale context. The groups share one c -> c conv; run as a G-group conv over B x (G c)
        # with the weight tiled G times (same result; ~2x faster to train on CPU than a c-channel conv on B G rows).
        tiled_weight = self.conv3x3.weight.repeat(self.groups, 1, 1, 1)
        tiled_bias = self.conv3x3.bias.repeat(self.groups)
        context = F.conv2d(x, tiled_weight, tiled_bias, padding=1, groups=self.groups)  # B (G c) H W
        context = context.reshape(batch * self.groups, channels // self.groups, height, width)  # (B G) c H W
        # Cross-spatial learning: each branch's channel descriptor (2D pool + softmax) weights the other branch.
        desc_local = local.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)  # (B G) 1 c
        desc_context = context.mean(dim=(2, 3)).softmax(dim=-1).unsqueeze(1)  # (B G) 1 c
        spatial = desc_local @ context.flatten(2) + desc_context @ local.flatten(2)  # (B G) 1 (H W)
        weights = spatial.reshape(batch * self.groups, 1, height, width).sigmoid()
        return (grouped * weights).reshape(batch, channels, height, width)  # B C H W


class SMA(nn.Module):
    """Spatially-aware multi-scale attention on an image: B C H W -> B C H W, the identity at initialisation."""

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 16,
        kernel_size: int = 3,
        patch_size: tuple[int, int] = (2, 2),
        groups: int = 4,
        *,
        identity_init: bool = True,
    ) -> None:
        """
        Args:
            in_chans: image channels C.
            dim: width d of the attention space (x_l); must be divisible by `groups`.
            kernel_size: n of the local and fusion n x n convolutions (odd, so padding keeps the size).
            patch_size: (h, w) of the unfolding patches; the paper requires h, w <= n.
            groups: EMA channel groups.
            identity_init: make SMA(x) == x at initialisation: the fusion conv copies the image half and
                starts with zero weights on the attention half (gradients reach the attention branch once
                those weights have moved, i.e. from the second optimiser step). False keeps PyTorch's default
                initialisation for the fusion conv.
        """
        super().__init__()
        ph, pw = (int(patch_size[0]), int(patch_size[1]))
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SMA kernel_size must be a positive odd number, got {kernel_size}")
        if not (1 <= ph <= kernel_size and 1 <= pw <= kernel_size):
            raise ValueError(
                f"SMA patch_size {tuple(patch_size)} must be between 1 and kernel_size {kernel_size} per side "
                "(paper III-B: h <= n and w <= n)"
            )
        if dim < 1 or in_chans < 1:
            raise ValueError(f"SMA in_chans ({in_chans}) and dim ({dim}) must be positive")
        self.in_chans = in_chans
        self.patch_size = (ph, pw)
        padding = kernel_size // 2
        self.local = nn.Conv2d(in_chans, in_chans, kernel_size, padding=padding)
        self.expand = nn.Conv2d(in_chans, dim, kernel_size=1)
        self.attention = EfficientMultiScaleAttention(dim, groups)
        self.project = nn.Conv2d(dim, in_chans, kernel_size=1)
        self.fusion = nn.Conv2d(2 * in_chans, in_chans, kernel_size, padding=padding)
        if identity_init:
            self.init_identity()

    @torch.no_grad()
    def init_identity(self) -> None:
        """Set the fusion conv to pass the image through and ignore the attention half (SMA(x) == x)."""
        self.fusion.weight.zero_()
        self.fusion.bias.zero_()
        centre = self.fusion.kernel_size[0] // 2
        for channel in range(self.in_chans):
            # Input channels are [image, attention]: the image half comes first in the concatenation.
            self.fusion.weight[channel, channel, centre, centre] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        ph, pw = self.patch_size
        if height < ph or width < pw:
            raise ValueError(f"SMA input {height}x{width} is smaller than its patch size {ph}x{pw}")
        features = self.expand(self.local(x))  # B d H W
        # Pad up to whole patches. Written as ceil-division so the padded size is visibly `grid * patch` for
        # symbolic-shape export; reflect padding needs pad < size, which holds because pad < patch <= size.
        grid_h, grid_w = (height + ph - 1) // ph, (width + pw - 1) // pw
        features = F.pad(features, (0, grid_w * pw - width, 0, grid_h * ph - height), mode="reflect")  # B d H' W'
        tokens = unfold_patches(features, self.patch_size)  # (B P) d Hn Wn, attention per position p (eq. 1)
        tokens = self.attention(tokens)  # (B P) d Hn Wn
        folded = fold_patches(tokens, self.patch_size)[..., :height, :width]  # B d H W
        return self.fusion(torch.cat([x, self.project(folded)], dim=1))  # B C H W

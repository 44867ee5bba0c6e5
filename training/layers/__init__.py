"""Building blocks, one idea per file (dinov2 `layers/` pattern)."""

from training.layers.attention import Attention
from training.layers.block import Block, DropPath
from training.layers.export_mode import exportable, is_exportable
from training.layers.layer_scale import LayerScale
from training.layers.mlp import Mlp, SwiGLUFFN
from training.layers.patch_embed import PatchEmbed, resample_patch_embed
from training.layers.pos_embed import resample_pos_embed
from training.layers.sma import SMA, EfficientMultiScaleAttention
from training.layers.windowed_attention import RelPosAttention, window_partition, window_unpartition

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "EfficientMultiScaleAttention",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "RelPosAttention",
    "SMA",
    "SwiGLUFFN",
    "exportable",
    "is_exportable",
    "resample_patch_embed",
    "resample_pos_embed",
    "window_partition",
    "window_unpartition",
]

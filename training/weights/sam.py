"""Reading SAM image-encoder checkpoints and converting them to the `training.models.sam_encoder` layout.

Sources (detected from keys only each one has):

* ``sam``: official `sam_vit_{b,l,h}_*.pth` (segment_anything `ImageEncoderViT` under `image_encoder.`, beside the
  prompt encoder and mask decoder, which are ignored), a bare image-encoder state dict, or our own layout. The
  architecture is inferred from tensor shapes (`infer_sam_arch`): the head count from the width of the relative
  tables, the window size and the global blocks from their lengths.
* ``hf_sam``: a Hugging Face `SamModel` / `SamVisionModel` directory (`vision_encoder.*`); the architecture comes from
  config.json (`arch_from_hf_sam_config`).

Key maps are data (`{}` = block number) and the `to_*` functions are their mirror images (torchtitan
`state_dict_adapter.py`); the loader follows timm `checkpoint_filter_fn`: unwrap, detect, strip the prefix, rename,
then resample position tables, relative tables and the patch kernel to the target model where shapes differ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from training.layers.pos_embed import resample_pos_embed
from training.layers.windowed_attention import resample_rel_pos
from training.models.sam_encoder import SamImageEncoder
from training.weights._io import BackboneCheckpoint, Sources, load_backbone, resample_patch_kernel
from training.weights._keys import block_depth, convert_keys, mirror_keys, square_patch

logger = logging.getLogger(__name__)

# Key (without prefix) that only each source's image encoder has.
SAM_SOURCE_MARKERS = {"sam": "neck.0.weight", "hf_sam": "neck.conv1.weight"}
SOURCES = Sources("SAM image encoder", SAM_SOURCE_MARKERS, hf_source="hf_sam")
detect_sam_source = SOURCES.detect  # (source, key prefix) of the encoder: ('sam', 'image_encoder.'), ...

# Official segment_anything layout -> ours. Only the MLP is renamed (our `Mlp` calls its layers fc1/fc2, which the
# adapters target); our own state dicts pass through the identity entries of FROM_OURS_ALIASES.
FROM_SAM_MAP: dict[str, str] = {
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "pos_embed": "pos_embed",
    "blocks.{}.norm1.weight": "blocks.{}.norm1.weight",
    "blocks.{}.norm1.bias": "blocks.{}.norm1.bias",
    "blocks.{}.attn.qkv.weight": "blocks.{}.attn.qkv.weight",
    "blocks.{}.attn.qkv.bias": "blocks.{}.attn.qkv.bias",
    "blocks.{}.attn.proj.weight": "blocks.{}.attn.proj.weight",
    "blocks.{}.attn.proj.bias": "blocks.{}.attn.proj.bias",
    "blocks.{}.attn.rel_pos_h": "blocks.{}.attn.rel_pos_h",
    "blocks.{}.attn.rel_pos_w": "blocks.{}.attn.rel_pos_w",
    "blocks.{}.norm2.weight": "blocks.{}.norm2.weight",
    "blocks.{}.norm2.bias": "blocks.{}.norm2.bias",
    "blocks.{}.mlp.lin1.weight": "blocks.{}.mlp.fc1.weight",
    "blocks.{}.mlp.lin1.bias": "blocks.{}.mlp.fc1.bias",
    "blocks.{}.mlp.lin2.weight": "blocks.{}.mlp.fc2.weight",
    "blocks.{}.mlp.lin2.bias": "blocks.{}.mlp.fc2.bias",
    "neck.0.weight": "neck.0.weight",
    "neck.1.weight": "neck.1.weight",
    "neck.1.bias": "neck.1.bias",
    "neck.2.weight": "neck.2.weight",
    "neck.3.weight": "neck.3.weight",
    "neck.3.bias": "neck.3.bias",
}
FROM_OURS_ALIASES: dict[str, str] = {
    "blocks.{}.mlp.fc1.weight": "blocks.{}.mlp.fc1.weight",
    "blocks.{}.mlp.fc1.bias": "blocks.{}.mlp.fc1.bias",
    "blocks.{}.mlp.fc2.weight": "blocks.{}.mlp.fc2.weight",
    "blocks.{}.mlp.fc2.bias": "blocks.{}.mlp.fc2.bias",
}

# Hugging Face `SamVisionEncoder` (`vision_encoder.*`) -> ours.
FROM_HF_SAM_MAP: dict[str, str] = {
    "patch_embed.projection.weight": "patch_embed.proj.weight",
    "patch_embed.projection.bias": "patch_embed.proj.bias",
    "pos_embed": "pos_embed",
    "layers.{}.layer_norm1.weight": "blocks.{}.norm1.weight",
    "layers.{}.layer_norm1.bias": "blocks.{}.norm1.bias",
    "layers.{}.attn.qkv.weight": "blocks.{}.attn.qkv.weight",
    "layers.{}.attn.qkv.bias": "blocks.{}.attn.qkv.bias",
    "layers.{}.attn.proj.weight": "blocks.{}.attn.proj.weight",
    "layers.{}.attn.proj.bias": "blocks.{}.attn.proj.bias",
    "layers.{}.attn.rel_pos_h": "blocks.{}.attn.rel_pos_h",
    "layers.{}.attn.rel_pos_w": "blocks.{}.attn.rel_pos_w",
    "layers.{}.layer_norm2.weight": "blocks.{}.norm2.weight",
    "layers.{}.layer_norm2.bias": "blocks.{}.norm2.bias",
    "layers.{}.mlp.lin1.weight": "blocks.{}.mlp.fc1.weight",
    "layers.{}.mlp.lin1.bias": "blocks.{}.mlp.fc1.bias",
    "layers.{}.mlp.lin2.weight": "blocks.{}.mlp.fc2.weight",
    "layers.{}.mlp.lin2.bias": "blocks.{}.mlp.fc2.bias",
    "neck.conv1.weight": "neck.0.weight",
    "neck.layer_norm1.weight": "neck.1.weight",
    "neck.layer_norm1.bias": "neck.1.bias",
    "neck.conv2.weight": "neck.2.weight",
    "neck.layer_norm2.weight": "neck.3.weight",
    "neck.layer_norm2.bias": "neck.3.bias",
}

# SamVisionConfig defaults (transformers 5.23, = SAM ViT-H) for fields an older config.json may omit.
HF_SAM_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "output_channels": 256,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 1024,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "mlp_ratio": 4.0,
    "use_abs_pos": True,
    "use_rel_pos": True,
    "window_size": 14,
    "global_attn_indexes": [2, 5, 8, 11],
    "mlp_dim": None,
}
HF_SAM_MODEL_TYPES = ("sam", "sam_vision_model")


def sam_checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: SamImageEncoder | None = None) -> dict[str, Tensor]:
    """Convert a SAM checkpoint (any supported source) to our layout, optionally resampled to `model`.

    With `model`, the absolute position table is resampled bicubically, relative tables linearly (both as the
    encoder does at run time, so loading at another `img_size` equals running the checkpoint at that size) and the
    patch kernel with FlexiViT's pseudo-inverse where shapes differ. Idempotent on our layout.

    Args:
        checkpoint: a state dict, possibly a whole SAM model or wrapped in `model` / `state_dict`.
        model: the encoder the result will be loaded into.
    """
    source, tensors = SOURCES.extract(checkpoint)
    if source == "hf_sam":
        out = convert_keys(tensors, FROM_HF_SAM_MAP, "Hugging Face SAM image encoder")
    else:
        out = convert_keys(tensors, {**FROM_SAM_MAP, **FROM_OURS_ALIASES}, "SAM image encoder")
    if model is None:
        return out
    expected = model.state_dict()
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and model.pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        logger.info("resampling pos_embed %s -> %s", tuple(pos_embed.shape), tuple(model.pos_embed.shape))
        old_grid = (pos_embed.shape[1], pos_embed.shape[2])
        flat = pos_embed.reshape(1, old_grid[0] * old_grid[1], -1)
        flat = resample_pos_embed(flat, model.pos_grid, old_grid, num_prefix_tokens=0)
        out["pos_embed"] = flat.reshape(model.pos_embed.shape)
    for key, tensor in out.items():
        if key.endswith((".rel_pos_h", ".rel_pos_w")) and key in expected and tensor.shape != expected[key].shape:
            logger.info("resampling %s %s -> %s", key, tuple(tensor.shape), tuple(expected[key].shape))
            out[key] = resample_rel_pos(tensor, expected[key].shape[0])
    resample_patch_kernel(out, model.patch_size)
    return out


def to_sam_original(state_dict: Mapping[str, Tensor], *, prefix: str = "image_encoder.") -> dict[str, Tensor]:
    """Our layout -> segment_anything layout (`sam_vit_*.pth` keys under `prefix`); mirror of FROM_SAM_MAP."""
    return {prefix + key: tensor for key, tensor in mirror_keys(state_dict, FROM_SAM_MAP, "SAM image encoder").items()}


def to_hf_sam(state_dict: Mapping[str, Tensor], *, prefix: str = "vision_encoder.") -> dict[str, Tensor]:
    """Our layout -> Hugging Face `SamVisionEncoder` keys under `prefix`; mirror of FROM_HF_SAM_MAP."""
    renamed = mirror_keys(state_dict, FROM_HF_SAM_MAP, "Hugging Face SAM image encoder")
    return {prefix + key: tensor for key, tensor in renamed.items()}


def infer_sam_arch(state_dict: Mapping[str, Tensor], path: Path | str = "checkpoint") -> dict[str, Any]:
    """SamImageEncoder kwargs from the tensor shapes of a state dict in our layout.

    Relative tables have 2 * size - 1 rows of head_dim columns: global blocks are sized by the token grid of the
    training resolution, windowed blocks by the window, so both the head count and the block list are recorded.
    """
    for key in ("patch_embed.proj.weight", "neck.0.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise ValueError(f"{path}: not a SAM image encoder state dict: {key!r} is missing")
    patch = square_patch(state_dict, path)  # D C p p
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = block_depth(state_dict, path)
    arch: dict[str, Any] = {
        "embed_dim": embed_dim,
        "in_chans": in_chans,
        "patch_size": patch_size,
        "depth": depth,
        "mlp_hidden_dim": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "out_chans": state_dict["neck.0.weight"].shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "use_abs_pos": "pos_embed" in state_dict,
        "use_rel_pos": "blocks.0.attn.rel_pos_h" in state_dict,
    }  # num_heads only when relative tables record the head width; else `build_backbone` fills it in
    grid: tuple[int, int] | None = None
    if "pos_embed" in state_dict:
        grid = (state_dict["pos_embed"].shape[1], state_dict["pos_embed"].shape[2])  # 1 gh gw D
    if arch["use_rel_pos"]:
        lengths = [
            (state_dict[f"blocks.{i}.attn.rel_pos_h"].shape[0], state_dict[f"blocks.{i}.attn.rel_pos_w"].shape[0])
            for i in range(depth)
        ]
        arch["num_heads"] = embed_dim // state_dict["blocks.0.attn.rel_pos_h"].shape[1]
        if grid is None:  # no position table: the longest tables belong to global blocks
            grid = ((max(h for h, _ in lengths) + 1) // 2, (max(w for _, w in lengths) + 1) // 2)
        global_lengths = (2 * grid[0] - 1, 2 * grid[1] - 1)
        windows = {(h + 1) // 2 for h, w in lengths if (h, w) != global_lengths}
        if len(windows) > 1 or any(h != w for h, w in lengths if (h, w) != global_lengths):
            raise ValueError(f"{path}: windowed blocks have unequal or non-square windows: tables {lengths}")
        # A window as large as the grid is indistinguishable from (and computes the same as) global attention.
        arch["window_size"] = windows.pop() if windows else 0
        arch["global_attn_indexes"] = tuple(i for i, pair in enumerate(lengths) if pair == global_lengths)
    if grid is None:
        raise ValueError(f"{path}: neither pos_embed nor relative tables record the training resolution")
    arch["img_size"] = (grid[0] * patch_size, grid[1] * patch_size)
    return arch


def arch_from_hf_sam_config(config: Mapping[str, Any], path: Path | str = "config.json") -> dict[str, Any]:
    """SamImageEncoder kwargs from a SamConfig (its `vision_config`) or SamVisionConfig dict."""
    model_type = config.get("model_type")
    if model_type not in HF_SAM_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a SAM model; expected one of {HF_SAM_MODEL_TYPES}")
    vision = config.get("vision_config", {}) if model_type == "sam" else config
    cfg = {**HF_SAM_VISION_DEFAULTS, **vision}
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported; SAM uses 'gelu'")
    image, patch = cfg["image_size"], cfg["patch_size"]
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise ValueError(f"{path}: patch_size {patch} is not square")
        patch = patch[0]
    hidden = int(cfg["hidden_size"])
    return {
        "img_size": image if isinstance(image, int) else (int(image[0]), int(image[1])),
        "patch_size": int(patch),
        "in_chans": int(cfg["num_channels"]),
        "embed_dim": hidden,
        "depth": int(cfg["num_hidden_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "mlp_hidden_dim": int(cfg["mlp_dim"]) if cfg["mlp_dim"] is not None else int(hidden * cfg["mlp_ratio"]),
        "out_chans": int(cfg["output_channels"]),
        "qkv_bias": bool(cfg["qkv_bias"]),
        "use_abs_pos": bool(cfg["use_abs_pos"]),
        "use_rel_pos": bool(cfg["use_rel_pos"]),
        "window_size": int(cfg["window_size"]),
        "global_attn_indexes": tuple(int(i) for i in cfg["global_attn_indexes"]),
        "layer_norm_eps": float(cfg["layer_norm_eps"]),
    }


def load_sam_weights(path: str | Path) -> BackboneCheckpoint:
    """Read a SAM checkpoint file or Hugging Face directory and convert its image encoder to our layout.

    Args:
        path: official `sam_vit_*.pth` (or an image-encoder / our-layout `.pth`, `.pt`, `.bin`, `.safetensors`),
            or a Hugging Face `SamModel` / `SamVisionModel` directory.

    Returns:
        converted state dict, SamImageEncoder kwargs, source name ('sam' or 'hf_sam') and the weight file read.
    """
    return load_backbone(
        path,
        SOURCES,
        label="SAM",
        help="a sam_vit_*.pth file or a Hugging Face folder",
        filter_fn=sam_checkpoint_filter_fn,
        arch_from_config=lambda config, _, where: arch_from_hf_sam_config(config, where),
        arch_from_tensors=infer_sam_arch,
    )

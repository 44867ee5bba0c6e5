"""Reading SAM mask-decoder weights and converting them to the `training.models.sam_decoder` layout.

mSAM (shared/papers/ta-lora-sam.md §3.3) starts every task's decoder from SAM's. Sources (detected from keys only
each one has, under the `mask_decoder.` prefix of a whole-SAM checkpoint or bare):

* ``sam``: official `sam_vit_{b,l,h}_*.pth` (segment_anything `MaskDecoder`), or our own layout. The architecture is
  read from tensor shapes (`infer_sam_decoder_arch`); the head count is not recorded and the LayerNorm epsilon is
  segment_anything's 1e-5.
* ``hf_sam``: a Hugging Face `SamModel` directory; the architecture comes from config.json's `mask_decoder_config`.

Besides the decoder, the prompt encoder's two tensors mSAM keeps are returned: the Gaussian matrix of the random
Fourier position encoding (official `prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`, Hugging Face
`shared_image_embedding.positional_embedding`) and the single "no mask" embedding (`prompt_encoder.no_mask_embed`),
which initialises mSAM's per-channel no-mask rows.

Key maps are data (`{}` = a number, several allowed) with mirror-image `to_*` functions, as in `training.weights.sam`
(torchtitan `state_dict_adapter.py`). Hugging Face writes SAM's MLPs as `proj_in`, `layers.{j}`, `proj_out`; those are
renumbered to SAM's `layers.{i}` first (`_hf_feedforward_to_sam`), since where `proj_out` lands depends on the depth.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from training.weights._io import Sources, open_checkpoint
from training.weights._keys import convert_keys, mirror_keys

logger = logging.getLogger(__name__)

DECODER_PREFIX = "mask_decoder."
# Key (without prefix) that only each source's mask decoder has.
DECODER_SOURCE_MARKERS = {"sam": "output_upscaling.0.weight", "hf_sam": "upscale_conv1.weight"}
SOURCES = Sources("SAM mask decoder", DECODER_SOURCE_MARKERS, hf_source="hf_sam")
SAM_PE_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
HF_PE_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
NO_MASK_KEY = "prompt_encoder.no_mask_embed.weight"
SAM_LAYER_NORM_EPS = 1e-5  # segment_anything builds the decoder's LayerNorms with nn.LayerNorm's default

_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
_PROJECTIONS = tuple(f"{p}_proj.{t}" for p in ("q", "k", "v", "out") for t in ("weight", "bias"))
_PARAMS = ("weight", "bias")

# Keys both source layouts (after `_hf_feedforward_to_sam` for Hugging Face) share with ours; the token MLP is renamed
# (our `Mlp` calls its layers fc1/fc2).
_COMMON_DECODER_KEYS: dict[str, str] = {
    "iou_token.weight": "iou_token.weight",
    "mask_tokens.weight": "mask_tokens.weight",
    **{
        f"transformer.layers.{{}}.{a}.{p}": f"transformer.layers.{{}}.{a}.{p}"
        for a in _ATTENTIONS
        for p in _PROJECTIONS
    },
    **{
        f"transformer.layers.{{}}.mlp.lin{n}.{t}": f"transformer.layers.{{}}.mlp.fc{n}.{t}"
        for n in (1, 2)
        for t in _PARAMS
    },
    **{
        f"transformer.final_attn_token_to_image.{p}": f"transformer.final_attn_token_to_image.{p}" for p in _PROJECTIONS
    },
    **{
        f"output_hypernetworks_mlps.{{}}.layers.{{}}.{t}": f"output_hypernetworks_mlps.{{}}.layers.{{}}.{t}"
        for t in _PARAMS
    },
    **{f"iou_prediction_head.layers.{{}}.{t}": f"iou_prediction_head.layers.{{}}.{t}" for t in _PARAMS},
}

# Official segment_anything layout -> ours: the norms and the upscaling keep their names.
FROM_SAM_DECODER_MAP: dict[str, str] = {
    **_COMMON_DECODER_KEYS,
    **{
        f"transformer.layers.{{}}.norm{n}.{t}": f"transformer.layers.{{}}.norm{n}.{t}"
        for n in range(1, 5)
        for t in _PARAMS
    },
    **{f"transformer.norm_final_attn.{t}": f"transformer.norm_final_attn.{t}" for t in _PARAMS},
    **{f"output_upscaling.{i}.{t}": f"output_upscaling.{i}.{t}" for i in (0, 1, 3) for t in _PARAMS},
}
# Our own state dicts pass through these identity entries.
FROM_OURS_ALIASES: dict[str, str] = {
    f"transformer.layers.{{}}.mlp.fc{n}.{t}": f"transformer.layers.{{}}.mlp.fc{n}.{t}" for n in (1, 2) for t in _PARAMS
}

# Hugging Face `SamMaskDecoder` (after `_hf_feedforward_to_sam`) -> ours: its norms and upscaling layers are named.
FROM_HF_SAM_DECODER_MAP: dict[str, str] = {
    **_COMMON_DECODER_KEYS,
    **{
        f"transformer.layers.{{}}.layer_norm{n}.{t}": f"transformer.layers.{{}}.norm{n}.{t}"
        for n in range(1, 5)
        for t in _PARAMS
    },
    **{f"transformer.layer_norm_final_attn.{t}": f"transformer.norm_final_attn.{t}" for t in _PARAMS},
    **{f"upscale_conv1.{t}": f"output_upscaling.0.{t}" for t in _PARAMS},
    **{f"upscale_layer_norm.{t}": f"output_upscaling.1.{t}" for t in _PARAMS},
    **{f"upscale_conv2.{t}": f"output_upscaling.3.{t}" for t in _PARAMS},
}

# SamMaskDecoderConfig defaults (transformers 5.23) for fields an older config.json may omit.
HF_SAM_DECODER_DEFAULTS: dict[str, Any] = {
    "hidden_size": 256,
    "hidden_act": "relu",
    "mlp_dim": 2048,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "attention_downsample_rate": 2,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "layer_norm_eps": 1e-6,
}

_FEEDFORWARDS = re.compile(r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.(proj_in|proj_out|layers\.(\d+))\.")


class DecoderCheckpoint(NamedTuple):
    """A SAM mask decoder converted to our layout, its architecture, mSAM's prompt-encoder tensors, and the source."""

    state_dict: dict[str, Tensor]
    arch: dict[str, Any]
    positional_encoding: Tensor | None  # 2 F Gaussian matrix of the grid's position encoding
    no_mask_embed: Tensor | None  # 1 C
    source: str
    path: Path


def _feedforward_depths(keys: list[str]) -> dict[str, int]:
    """Number of Linear layers of each Hugging Face `SamFeedForward` (proj_in + layers + proj_out)."""
    depths: dict[str, int] = {}
    for key in keys:
        match = _FEEDFORWARDS.match(key)
        if match and key.endswith(".weight"):
            depths[match.group(1)] = depths.get(match.group(1), 0) + 1
    return depths


def _hf_feedforward_to_sam(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`proj_in` -> `layers.0`, `layers.j` -> `layers.{j+1}`, `proj_out` -> `layers.{n-1}` (SAM's `MLP` numbering)."""
    depths = _feedforward_depths(list(tensors))
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        match = _FEEDFORWARDS.match(key)
        if match is None:
            out[key] = tensor
            continue
        owner, part = match.group(1), match.group(2)
        index = 0 if part == "proj_in" else depths[owner] - 1 if part == "proj_out" else int(match.group(3)) + 1
        out[f"{owner}.layers.{index}.{key[match.end() :]}"] = tensor
    return out


def _sam_feedforward_to_hf(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mirror of `_hf_feedforward_to_sam`."""
    depths = _feedforward_depths(list(tensors))
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        match = _FEEDFORWARDS.match(key)
        if match is None or match.group(3) is None:
            out[key] = tensor
            continue
        owner, index = match.group(1), int(match.group(3))
        part = "proj_in" if index == 0 else "proj_out" if index == depths[owner] - 1 else f"layers.{index - 1}"
        out[f"{owner}.{part}.{key[match.end() :]}"] = tensor
    return out


def sam_decoder_filter_fn(checkpoint: Mapping[str, Any]) -> tuple[str, dict[str, Tensor]]:
    """Convert the mask decoder of a SAM checkpoint (any supported source) to our layout.

    Args:
        checkpoint: a state dict, possibly a whole SAM model or wrapped in `model` / `state_dict`.

    Returns:
        The source name and the decoder's tensors in `SamMaskDecoder` keys.

    Raises:
        ValueError: no (or several) mask decoders, or keys the map does not know.
    """
    source, tensors = SOURCES.extract(checkpoint)
    if source == "hf_sam":
        return source, convert_keys(
            _hf_feedforward_to_sam(tensors), FROM_HF_SAM_DECODER_MAP, "Hugging Face SAM mask decoder"
        )
    return source, convert_keys(tensors, {**FROM_SAM_DECODER_MAP, **FROM_OURS_ALIASES}, "SAM mask decoder")


def to_sam_decoder_original(state_dict: Mapping[str, Tensor], *, prefix: str = DECODER_PREFIX) -> dict[str, Tensor]:
    """Our layout -> segment_anything `MaskDecoder` keys under `prefix`; mirror of FROM_SAM_DECODER_MAP."""
    renamed = mirror_keys(state_dict, FROM_SAM_DECODER_MAP, "SAM mask decoder")
    return {prefix + key: tensor for key, tensor in renamed.items()}


def to_hf_sam_decoder(state_dict: Mapping[str, Tensor], *, prefix: str = DECODER_PREFIX) -> dict[str, Tensor]:
    """Our layout -> Hugging Face `SamMaskDecoder` keys under `prefix`; mirror of FROM_HF_SAM_DECODER_MAP."""
    renamed = _sam_feedforward_to_hf(mirror_keys(state_dict, FROM_HF_SAM_DECODER_MAP, "Hugging Face SAM mask decoder"))
    return {prefix + key: tensor for key, tensor in renamed.items()}


def _count(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    if found != set(range(len(found))):
        raise ValueError(f"layers matching {pattern!r} are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def infer_sam_decoder_arch(state_dict: Mapping[str, Tensor], path: Path | str = "checkpoint") -> dict[str, Any]:
    """SamMaskDecoder kwargs from the tensor shapes of a decoder state dict in our layout.

    The head count is not in the weights (it is left out: the caller's value stands); the LayerNorm epsilon is
    segment_anything's.
    """
    for key in ("iou_token.weight", "mask_tokens.weight", "transformer.final_attn_token_to_image.q_proj.weight"):
        if key not in state_dict:
            raise ValueError(f"{path}: not a SAM mask decoder state dict: {key!r} is missing")
    dim = state_dict["iou_token.weight"].shape[1]
    depth = _count(state_dict, r"^transformer\.layers\.(\d+)\.norm1\.weight$")
    iou_depth = _count(state_dict, r"^iou_prediction_head\.layers\.(\d+)\.weight$")
    return {
        "transformer_dim": dim,
        "depth": depth,
        "mlp_dim": state_dict["transformer.layers.0.mlp.fc1.weight"].shape[0] if depth else 2048,
        "attention_downsample_rate": dim // state_dict["transformer.final_attn_token_to_image.q_proj.weight"].shape[0],
        "num_multimask_outputs": state_dict["mask_tokens.weight"].shape[0] - 1,
        "iou_head_depth": iou_depth,
        "iou_head_hidden_dim": state_dict["iou_prediction_head.layers.0.weight"].shape[0] if iou_depth > 1 else 256,
        "layer_norm_eps": SAM_LAYER_NORM_EPS,
    }


def arch_from_hf_sam_decoder_config(config: Mapping[str, Any], path: Path | str = "config.json") -> dict[str, Any]:
    """SamMaskDecoder kwargs from a SamConfig dict (its `mask_decoder_config`)."""
    if config.get("model_type") != "sam":
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not a whole SAM model ('sam')")
    cfg = {**HF_SAM_DECODER_DEFAULTS, **config.get("mask_decoder_config", {})}
    if cfg["hidden_act"] != "relu":
        raise ValueError(f"{path}: mask decoder hidden_act {cfg['hidden_act']!r} is not supported; SAM uses 'relu'")
    return {
        "transformer_dim": int(cfg["hidden_size"]),
        "depth": int(cfg["num_hidden_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "mlp_dim": int(cfg["mlp_dim"]),
        "attention_downsample_rate": int(cfg["attention_downsample_rate"]),
        "num_multimask_outputs": int(cfg["num_multimask_outputs"]),
        "iou_head_depth": int(cfg["iou_head_depth"]),
        "iou_head_hidden_dim": int(cfg["iou_head_hidden_dim"]),
        "layer_norm_eps": float(cfg["layer_norm_eps"]),
    }


def _first(state_dict: Mapping[str, Any], keys: tuple[str, ...]) -> Tensor | None:
    for key in keys:
        for name, value in state_dict.items():
            if (name == key or name.endswith("." + key)) and isinstance(value, Tensor):
                return value
    return None


def load_sam_decoder_weights(path: str | Path, *, required: bool = True) -> DecoderCheckpoint | None:
    """Read the mask decoder (and mSAM's prompt-encoder tensors) of a SAM checkpoint file or Hugging Face directory.

    Args:
        path: official `sam_vit_*.pth` (or a `.pt`, `.bin`, `.safetensors` with `mask_decoder.*` keys), or a Hugging
            Face `SamModel` directory.
        required: raise when the checkpoint holds no mask decoder (else return None, e.g. an encoder-only file).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: no mask decoder (with `required`), or unknown keys.
    """
    state_dict, config, weights_path = open_checkpoint(path, "a sam_vit_*.pth file or a Hugging Face folder")
    if SOURCES.find(state_dict) is None:
        if required:
            raise ValueError(
                f"{weights_path} holds no SAM mask decoder (`mask_decoder.*`); pass a whole-SAM checkpoint "
                f"(sam_vit_*.pth or a Hugging Face SamModel folder) as model.msam.decoder_checkpoint"
            )
        return None
    source, decoder = sam_decoder_filter_fn(state_dict)
    if source == "hf_sam":
        if config is None:
            raise ValueError(f"{path} holds Hugging Face SAM keys: pass its directory (with config.json) instead")
        arch = arch_from_hf_sam_decoder_config(config, Path(path).expanduser() / "config.json")
        pe = _first(state_dict, HF_PE_KEYS)
    else:
        arch = infer_sam_decoder_arch(decoder, weights_path)
        pe = _first(state_dict, (SAM_PE_KEY,))
    no_mask = _first(state_dict, (NO_MASK_KEY,))
    logger.info("read a %s mask decoder from %s: %s", source, weights_path, arch)
    return DecoderCheckpoint(decoder, arch, pe, no_mask, source, weights_path)

"""SAM image encoder: parity with transformers' SamModel / SamVisionModel, the official `sam_vit_*.pth` layout,
resampling to other sizes, registry and error messages.

Reference models are built from tiny random configs (width 32, 4 blocks of 2 heads, blocks 1 and 3 global, window 3
on an 8 x 8 grid so windows are padded), with the position table, relative tables and LayerNorms perturbed so each
of them changes the output.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers  # dev dependency: the reference implementations of the parity tests
from safetensors.torch import load_file

from training.builders.backbones import ENCODERS, build_backbone, describe
from training.layers.export_mode import exportable
from training.layers.windowed_attention import get_rel_pos, window_partition, window_unpartition
from training.models.sam_encoder import SamImageEncoder
from training.weights.sam import (
    detect_sam_source,
    infer_sam_arch,
    load_sam_weights,
    sam_checkpoint_filter_fn,
    to_hf_sam,
    to_sam_original,
)

pytestmark = pytest.mark.timeout(60)

ATOL = 1e-4
IMAGE = 128  # 8 x 8 tokens of 16 px
VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "image_size": IMAGE,
    "patch_size": 16,
    "window_size": 3,
    "global_attn_indexes": [1, 3],
    "output_channels": 16,
    "mlp_dim": 48,
}
# The official layout, written by hand from the Hugging Face names (independent of training.weights.sam's tables).
HF_TO_OFFICIAL = [
    ("vision_encoder.", "image_encoder."),
    ("layers.", "blocks."),
    ("patch_embed.projection.", "patch_embed.proj."),
    ("layer_norm1.", "norm1."),
    ("layer_norm2.", "norm2."),
    ("neck.conv1.", "neck.0."),
    ("neck.norm1.", "neck.1."),
    ("neck.conv2.", "neck.2."),
    ("neck.norm2.", "neck.3."),
]


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    # SamVisionConfig initialises Linear weights with std 1e-10 and the position tables with zeros, which would make
    # every block a no-op; give every tensor a scale at which it changes the output.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.normal_(std=0.5)
            elif "layer_norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.ndim >= 2:
                param.normal_(std=param[0].numel() ** -0.5)  # 1 / sqrt(fan_in)
            else:
                param.normal_(std=0.1)
    return model.eval()


def _hf_sam(seed: int = 0, **vision: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.SamConfig(vision_config={**VISION, **vision})
    return _perturb(transformers.SamModel(config))


def _hf_vision(seed: int = 0, **vision: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _perturb(transformers.SamVisionModel(transformers.SamVisionConfig(**{**VISION, **vision})))


def _reference(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(hf, transformers.SamModel):
            return hf.get_image_embeddings(x)
        return hf(pixel_values=x).last_hidden_state


def _max_diff(ours: torch.nn.Module, hf: torch.nn.Module, batch: int = 2) -> float:
    torch.manual_seed(1)
    x = torch.randn(batch, 3, IMAGE, IMAGE)
    reference = _reference(hf, x)
    with torch.no_grad():
        out = ours.eval().forward_features(x)
    embeddings = out["image_embeddings"]
    assert embeddings.shape == reference.shape == (batch, VISION["output_channels"], IMAGE // 16, IMAGE // 16)
    torch.testing.assert_close(embeddings, reference, atol=ATOL, rtol=0)
    return (embeddings - reference).abs().max().item()


def _official(hf: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A whole-SAM state dict in segment_anything's layout (image encoder + other parts, which the loader skips)."""
    out = {}
    for key, tensor in hf.state_dict().items():
        if key.startswith("vision_encoder."):
            key = key.replace("neck.layer_norm", "neck.norm")
            for old, new in HF_TO_OFFICIAL:
                key = key.replace(old, new)
        out[key] = tensor
    return out


@pytest.mark.parametrize("kind", ["SamModel", "SamVisionModel"])
def test_hf_directory_matches_transformers(tmp_path: Path, kind: str) -> None:
    hf = _hf_sam() if kind == "SamModel" else _hf_vision()
    hf.save_pretrained(tmp_path)
    ours = build_backbone("sam_tiny", tmp_path)
    assert isinstance(ours, SamImageEncoder)
    assert (ours.embed_dim, ours.num_heads, ours.window_size, ours.global_attn_indexes) == (32, 2, 3, (1, 3))
    diff = _max_diff(ours, hf)
    logging.getLogger(__name__).info("SAM %s max abs diff %.2e", kind, diff)


def test_official_pth_matches_transformers(tmp_path: Path) -> None:
    hf = _hf_sam(seed=2)
    path = tmp_path / "sam_vit_t_000000.pth"
    torch.save(_official(hf), path)
    loaded = load_sam_weights(path)
    assert loaded.source == "sam"
    arch = loaded.arch
    assert arch["img_size"] == (IMAGE, IMAGE) and arch["num_heads"] == 2 and arch["mlp_hidden_dim"] == 48
    assert (arch["window_size"], arch["global_attn_indexes"], arch["out_chans"]) == (3, (1, 3), 16)
    _max_diff(build_backbone("sam_vitb", path), hf)


def test_wrapped_and_bare_encoder_checkpoints(tmp_path: Path) -> None:
    hf = _hf_sam(seed=3)
    encoder = {k.removeprefix("image_encoder."): v for k, v in _official(hf).items() if "image_encoder." in k}
    torch.save({"model": encoder}, tmp_path / "wrapped.pth")
    _max_diff(build_backbone("sam_tiny", tmp_path / "wrapped.pth"), hf)
    # Our own layout (fc1/fc2) loads as well: filter_fn is idempotent.
    ours = sam_checkpoint_filter_fn(encoder)
    assert sam_checkpoint_filter_fn(ours).keys() == ours.keys()


def test_mirrors_round_trip(tmp_path: Path) -> None:
    hf = _hf_sam(seed=4)
    hf.save_pretrained(tmp_path)
    ours = load_sam_weights(tmp_path).state_dict
    original = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if k.startswith("vision_encoder.")}
    back = to_hf_sam(ours)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)
    official = {k: v for k, v in _official(hf).items() if k.startswith("image_encoder.")}
    mirrored = to_sam_original(ours)
    assert mirrored.keys() == official.keys()
    assert all(torch.equal(mirrored[k], official[k]) for k in official)


def test_source_detection() -> None:
    assert detect_sam_source({"image_encoder.neck.0.weight": 0, "mask_decoder.x": 0}) == ("sam", "image_encoder.")
    assert detect_sam_source({"vision_encoder.neck.conv1.weight": 0}) == ("hf_sam", "vision_encoder.")
    assert detect_sam_source({"neck.0.weight": 0}) == ("sam", "")
    with pytest.raises(ValueError, match="no SAM image encoder found"):
        detect_sam_source({"patch_embed.proj.weight": 0})  # a DINOv2 ViT is not a SAM encoder


def test_img_size_override_equals_running_at_that_size(tmp_path: Path) -> None:
    # Loading at 96 px resamples the position and global relative tables exactly as the encoder does at run time.
    hf = _hf_sam(seed=5)
    hf.save_pretrained(tmp_path)
    native = build_backbone("sam_tiny", tmp_path).eval()
    resized = build_backbone("sam_tiny", tmp_path, img_size=96).eval()
    assert resized.pos_embed.shape == (1, 6, 6, 32)
    assert resized.blocks[1].attn.rel_pos_h.shape == (11, 16)  # global: 2 * 6 - 1
    assert resized.blocks[0].attn.rel_pos_h.shape == (5, 16)  # windowed: 2 * 3 - 1, unchanged
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), native(x), atol=1e-5, rtol=0)


def test_other_input_sizes_and_intermediates() -> None:
    model = build_backbone("sam_tiny").eval()
    x = torch.randn(2, 3, 80, 112)  # 5 x 7 tokens: windows padded on both axes, tables resampled
    with torch.no_grad():
        out = model.forward_features(x)
        maps = model.forward_intermediates(x, [1, -1])
    assert out["image_embeddings"].shape == (2, 32, 5, 7) and out["grid_size"] == (5, 7)
    assert out["x_patchtokens"].shape == (2, 35, 64)
    assert [m.shape for m in maps] == [(2, 64, 5, 7)] * 2
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), out["x_patchtokens"])
    with pytest.raises(ValueError, match=r"100x112 is not a multiple of the patch size 16.*96x112 or 112x112"):
        model(torch.randn(1, 3, 100, 112))


def test_export_mode_matches_fused_attention() -> None:
    model = build_backbone("sam_tiny").eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2 and param.shape[1] == 32:  # relative tables: non-zero so the bias path is checked
                param.normal_()
        x = torch.randn(2, 3, 96, 128)
        fused = model(x)
        with exportable():
            explicit = model(x)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)


def test_window_helpers_round_trip_and_rel_pos() -> None:
    x = torch.randn(2, 5, 7, 4)
    windows, padded = window_partition(x, 3)
    assert windows.shape == (2 * 2 * 3, 3, 3, 4) and padded == (6, 9)
    torch.testing.assert_close(window_unpartition(windows, 3, padded, (5, 7)), x)
    table = torch.randn(9, 2)
    rel = get_rel_pos(5, 5, table)  # rel[i, j] = table[i - j + 4]
    torch.testing.assert_close(rel[4, 0], table[8])
    torch.testing.assert_close(rel[0, 4], table[0])
    resized = get_rel_pos(3, 3, table)  # resampled linearly to 5 rows
    expected = F.interpolate(table.T[None], size=5, mode="linear")[0].T
    torch.testing.assert_close(resized[0, 0], expected[2])


# Image-encoder parameter counts of the released sam_vit_{b,l,h} checkpoints.
PARAMS = {"sam_vitb": 89_670_912, "sam_vitl": 308_278_272, "sam_vith": 637_026_048}


@pytest.mark.parametrize(
    ("name", "hf_size"),
    [
        ("sam_vitb", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}),
        ("sam_vitl", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}),
        ("sam_vith", {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16}),
    ],
)
def test_registry_sizes_match_transformers(name: str, hf_size: dict[str, int]) -> None:
    with torch.device("meta"):
        ours = build_backbone(name)
        hf = transformers.SamVisionModel(transformers.SamVisionConfig(**hf_size, global_attn_indexes=[0]))
    ours_params = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_params = {k: tuple(v.shape) for k, v in to_hf_sam(ours.state_dict()).items()}
    reference = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    # Same tensors and shapes except the relative tables, which depend on the global block list.
    assert hf_params.keys() == reference.keys()
    assert {k: s for k, s in hf_params.items() if "rel_pos" not in k} == {
        k: s for k, s in reference.items() if "rel_pos" not in k
    }
    assert (ours.img_size, ours.patch_size, ours.out_chans, ours.window_size) == ((1024, 1024), 16, 256, 14)
    assert len(ours_params) == len(reference)
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[name]


def test_describe_rebuilds_and_records_architecture(tmp_path: Path) -> None:
    hf = _hf_sam(seed=6)
    hf.save_pretrained(tmp_path)
    ours = build_backbone("sam_tiny", tmp_path)
    arch = describe(ours)
    assert arch["global_attn_indexes"] == (1, 3) and arch["mlp_hidden_dim"] == 48 and arch["out_chans"] == 16
    rebuilt = build_backbone("sam_tiny", **arch)
    rebuilt.load_state_dict(ours.state_dict())  # strict: same architecture without the source checkpoint
    assert ENCODERS["sam_tiny"] is not None


def test_name_mismatch_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _hf_sam(seed=7).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.builders.backbones"):
        model = build_backbone("sam_vitl", tmp_path)
    assert model.embed_dim == 32
    assert "differs from sam_vitl" in caplog.text and "embed_dim 1024 -> 32" in caplog.text


def test_errors_name_file_key_and_shape(tmp_path: Path) -> None:
    hf = _hf_sam(seed=8)
    state = _official(hf)
    state["image_encoder.neck.2.weight"] = torch.zeros(16, 16, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"bad\.pth: shape mismatch.*neck\.2\.weight: checkpoint \(16, 16, 1, 1\), "):
        build_backbone("sam_tiny", path)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="holds Hugging Face SAM keys: pass its directory"):
        load_sam_weights(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        build_backbone("sam_tiny", tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone("sam_tiny", tmp_path / "missing.pth")
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*no SAM image encoder|no SAM image encoder"):
        build_backbone("sam_tiny", tmp_path / "partial.pth")


def test_infer_arch_without_global_blocks() -> None:
    model = SamImageEncoder(img_size=64, embed_dim=32, depth=2, num_heads=4, window_size=2, global_attn_indexes=())
    arch = infer_sam_arch(model.state_dict())
    assert (arch["num_heads"], arch["window_size"], arch["global_attn_indexes"]) == (4, 2, ())

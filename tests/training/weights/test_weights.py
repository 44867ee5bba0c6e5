"""Checkpoint loading: numerical parity with transformers' DINOv2 models and the original DINOv2 key layout.

Reference models are `transformers.Dinov2Model` / `Dinov2WithRegistersModel` built from tiny random configs, with
LayerScale, position embeddings and tokens perturbed so that each of them changes the output. Inputs are non-square
(5 x 7 tokens from a 4 x 4 position table) so position-embedding interpolation is exercised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers  # dev dependency: the reference implementations of the parity tests
from safetensors.torch import load_file, save_file

from training.builders.backbones import build_backbone
from training.layers.pos_embed import resample_pos_embed
from training.weights.dinov2 import (
    checkpoint_filter_fn,
    detect_source,
    load_backbone_weights,
    to_dinov2_original,
    to_hf_dinov2,
)

pytestmark = pytest.mark.timeout(60)

ATOL = 1e-4
IMAGE = (70, 98)  # 5 x 7 patches of 14 px; the position table is 4 x 4 (image_size 56)


def _hf_model(registers: int = 0, swiglu: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
        "use_swiglu_ffn": swiglu,
    }
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambda1" in name:  # LayerScale: away from 1 so a missing or swapped gamma shows
                param.uniform_(0.3, 1.7)
            elif "position_embeddings" in name or "cls_token" in name or "register_tokens" in name:
                param.normal_()  # init is ~0.02; make positions and prefix tokens matter
            elif "layernorm" in name or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _hf_outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state  # B (1 + R + N) D, after the final layernorm


def _assert_matches_hf(ours: torch.nn.Module, hf: torch.nn.Module, size: tuple[int, int] = IMAGE) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    reference = _hf_outputs(hf, x)
    with torch.no_grad():
        out = ours.eval().forward_features(x)
    prefix = ours.num_prefix_tokens
    torch.testing.assert_close(out["x_norm_clstoken"], reference[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_norm_regtokens"], reference[:, 1:prefix], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], reference[:, prefix:], atol=ATOL, rtol=0)
    assert out["grid_size"] == (size[0] // 14, size[1] // 14)


def _our_state_dict(hf: torch.nn.Module, tmp_path: Path) -> dict[str, torch.Tensor]:
    hf.save_pretrained(tmp_path / "hf_export")
    return load_backbone_weights(tmp_path / "hf_export").state_dict


@pytest.mark.parametrize(
    ("registers", "swiglu"),
    [(0, False), (0, True), (4, False), (4, True)],
    ids=["dinov2", "dinov2-swiglu", "registers", "registers-swiglu"],
)
def test_hf_safetensors_directory_matches_transformers(tmp_path: Path, registers: int, swiglu: bool) -> None:
    hf = _hf_model(registers, swiglu)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = build_backbone("dinov2_vits14", tmp_path)
    assert (ours.embed_dim, len(ours.blocks), ours.num_heads) == (64, 3, 2)
    assert ours.num_register_tokens == registers
    assert ours.ffn_layer == ("swiglu" if swiglu else "mlp")
    assert ours.interpolate_offset == 0.0 and ours.interpolate_antialias == bool(registers)
    _assert_matches_hf(ours, hf)
    _assert_matches_hf(ours, hf, size=(56, 56))  # native grid: no interpolation


def test_hf_pytorch_model_bin_directory(tmp_path: Path) -> None:
    hf = _hf_model(swiglu=True, seed=3)
    hf.save_pretrained(tmp_path)
    # transformers 5 always writes safetensors; rewrite the same tensors as the legacy pytorch_model.bin.
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    _assert_matches_hf(build_backbone("dinov2_vitg14", tmp_path), hf)


def test_hf_sharded_safetensors_directory(tmp_path: Path) -> None:
    hf = _hf_model(registers=4, seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _assert_matches_hf(build_backbone("dinov2_vits14_reg", tmp_path), hf)


def test_transformers_v5_module_names_convert(tmp_path: Path) -> None:
    # Dinov2Model().state_dict() in transformers >= 5 uses q_proj/o_proj/gate_proj names, not the hub layout.
    hf = _hf_model(swiglu=True, seed=5)
    in_memory = checkpoint_filter_fn(hf.state_dict())
    from_file = _our_state_dict(hf, tmp_path)
    assert in_memory.keys() == from_file.keys()
    for key, tensor in from_file.items():
        torch.testing.assert_close(in_memory[key], tensor, atol=0, rtol=0)


def test_hf_layout_round_trip(tmp_path: Path) -> None:
    hf = _hf_model(registers=4, swiglu=True, seed=6)
    hf.save_pretrained(tmp_path)
    ours = load_backbone_weights(tmp_path).state_dict
    written = to_hf_dinov2(ours)
    original = load_file(tmp_path / "model.safetensors")
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        torch.testing.assert_close(written[key], tensor, atol=0, rtol=0)


def test_original_layout_reproduces_hf_on_native_grid(tmp_path: Path) -> None:
    hf = _hf_model(seed=7)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(to_dinov2_original(_our_state_dict(hf, tmp_path)), path)
    ours = build_backbone("dinov2_vits14", path, num_heads=2)
    # Original DINOv2 without registers resamples with scale_factor and offset 0.1 (dinov2 hub conventions).
    assert (ours.interpolate_offset, ours.interpolate_antialias) == (0.1, False)
    # On the native 4 x 4 grid neither implementation resamples, so the outputs must agree exactly.
    _assert_matches_hf(ours, hf, size=(56, 56))


def test_original_layout_interpolation_convention(tmp_path: Path) -> None:
    """Each source keeps its own convention: the offset-0.1 positions are the dinov2 formula, not transformers'."""
    hf = _hf_model(seed=8)
    path = tmp_path / "x.pth"
    torch.save(to_dinov2_original(_our_state_dict(hf, tmp_path)), path)
    original = build_backbone("dinov2_vits14", path, num_heads=2).eval()
    # With the Hugging Face convention forced, the same weights reproduce transformers on a non-square input.
    _assert_matches_hf(build_backbone("dinov2_vits14", path, num_heads=2, interpolate_offset=0.0), hf)
    # With its own convention, the tokens use positions resampled with scale_factor = (5.1 / 4, 7.1 / 4).
    table = original.pos_embed.detach()
    grid = table[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, scale_factor=(5.1 / 4, 7.1 / 4), mode="bicubic")
    expected = torch.cat((table[:, :1], expected.flatten(2).transpose(1, 2)), dim=1)
    torch.testing.assert_close(original.interpolate_pos_encoding((5, 7)), expected, atol=1e-6, rtol=0)
    size_based = resample_pos_embed(table, (5, 7), interpolate_offset=0.0)
    assert (size_based - expected).abs().max() > 1e-3  # the conventions really differ on this grid
    x = torch.randn(1, 3, *IMAGE)
    with torch.no_grad():
        tokens = original.prepare_tokens(x)
        patches = original.patch_embed(x)
    torch.testing.assert_close(tokens[:, 1:] - patches, expected[:, 1:].expand_as(patches), atol=1e-5, rtol=0)


def test_original_registers_layout_matches_hf_on_non_square_input(tmp_path: Path) -> None:
    # dinov2 `*_reg` models resample by size with antialias, exactly like Dinov2WithRegistersModel.
    hf = _hf_model(registers=4, swiglu=True, seed=9)
    path = tmp_path / "dinov2_vitg14_reg4_pretrain.pth"
    torch.save(to_dinov2_original(_our_state_dict(hf, tmp_path)), path)
    ours = build_backbone("dinov2_vits14_reg", path, num_heads=2)
    assert ours.num_register_tokens == 4 and ours.ffn_layer == "swiglu"
    _assert_matches_hf(ours, hf)


def test_chunked_and_wrapped_original_checkpoints_load(tmp_path: Path) -> None:
    hf = _hf_model(registers=4, seed=10)
    ours = _our_state_dict(hf, tmp_path)
    chunked = to_dinov2_original(ours, block_chunks=2)
    assert "blocks.1.2.attn.qkv.weight" in chunked and "blocks.0.0.norm1.weight" in chunked
    checkpoints = {
        "chunked.pth": chunked,
        "wrapped.pth": {"model": chunked, "iteration": 3},
        "teacher.pth": {"teacher": {f"backbone.{k}": v for k, v in chunked.items()}},
        "student_teacher.pth": {
            "model": {
                **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in chunked.items()},
                **{f"teacher.backbone.{k}": v for k, v in chunked.items()},
            }
        },
    }
    for name, checkpoint in checkpoints.items():
        torch.save(checkpoint, tmp_path / name)
        model = build_backbone("dinov2_vits14_reg", tmp_path / name, num_heads=2)
        _assert_matches_hf(model, hf)
    # The model itself also accepts an original (chunked, with mask_token) state dict.
    model = build_backbone("dinov2_vits14_reg", embed_dim=64, depth=3, num_heads=2, img_size=56)
    model.load_state_dict(chunked, strict=True)
    _assert_matches_hf(model, hf)


def test_safetensors_original_layout_file(tmp_path: Path) -> None:
    hf = _hf_model(registers=4, seed=11)
    path = tmp_path / "backbone.safetensors"
    save_file(to_dinov2_original(_our_state_dict(hf, tmp_path)), path)
    _assert_matches_hf(build_backbone("dinov2_vits14_reg", path, num_heads=2), hf)


def test_source_detection_uses_keys_only_each_source_has() -> None:
    ours = build_backbone("vit_tiny_p14").state_dict()
    assert detect_source(ours) == ("dinov2", "")
    assert detect_source({f"backbone.{k}": v for k, v in ours.items()}) == ("dinov2", "backbone.")
    assert detect_source({f"dinov2.{k}": v for k, v in to_hf_dinov2(ours).items()}) == ("hf_dinov2", "dinov2.")
    with pytest.raises(ValueError, match="no DINOv2 backbone"):
        detect_source({"encoder.weight": torch.zeros(1)})


def test_name_mismatch_warns_and_checkpoint_architecture_wins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _hf_model(seed=12).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.builders.backbones"):
        model = build_backbone("dinov2_vitl14", tmp_path)
    assert model.embed_dim == 64
    assert "differs from dinov2_vitl14" in caplog.text and "embed_dim 1024 -> 64" in caplog.text


def test_override_img_size_resamples_position_table(tmp_path: Path) -> None:
    hf = _hf_model(seed=13)
    hf.save_pretrained(tmp_path)
    model = build_backbone("dinov2_vits14", tmp_path, img_size=IMAGE)
    assert model.pos_grid == (5, 7)
    # Resampled once at load time with the model's convention = resampled at run time: same outputs as HF.
    _assert_matches_hf(model, hf)


# ---------------------------------------------------------------------------------------------------------------
# Errors name the file, the key and the shapes


def test_missing_config_json(tmp_path: Path) -> None:
    _hf_model(seed=14).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found: a Hugging Face model directory needs"):
        build_backbone("dinov2_vits14", tmp_path)


def test_missing_weights_file(tmp_path: Path) -> None:
    _hf_model(seed=15).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found: .*pytorch_model\.bin"):
        build_backbone("dinov2_vits14", tmp_path)


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pth does not exist"):
        build_backbone("dinov2_vits14", tmp_path / "nothing.pth")


def test_missing_shard(tmp_path: Path) -> None:
    _hf_model(seed=16).save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        build_backbone("dinov2_vits14", tmp_path)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    state_dict = to_dinov2_original(_our_state_dict(_hf_model(seed=17), tmp_path))
    state_dict["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    with pytest.raises(
        ValueError, match=r"broken\.pth.*blocks\.1\.mlp\.fc2\.weight: checkpoint \(64, 100\), model expects \(64, 256\)"
    ):
        build_backbone("dinov2_vits14", path, num_heads=2)


def test_hf_config_that_disagrees_with_weights(tmp_path: Path) -> None:
    _hf_model(seed=18).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_ratio"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: shape mismatch.*blocks\.0\.mlp\.fc1\.weight"):
        build_backbone("dinov2_vits14", tmp_path)


def test_missing_block_tensor_is_named(tmp_path: Path) -> None:
    state_dict = _our_state_dict(_hf_model(seed=19), tmp_path)
    del state_dict["blocks.2.ls2.gamma"]
    path = tmp_path / "partial.pth"
    torch.save(state_dict, path)
    with pytest.raises(RuntimeError, match=r"partial\.pth.*missing \['blocks\.2\.ls2\.gamma'\]"):
        build_backbone("dinov2_vits14", path, num_heads=2)


def test_hf_weights_file_passed_directly_is_rejected(tmp_path: Path) -> None:
    _hf_model(seed=20).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass its directory"):
        build_backbone("dinov2_vits14", tmp_path / "model.safetensors")


def test_unknown_hf_model_type(tmp_path: Path) -> None:
    _hf_model(seed=21).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "vit"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'vit' is not supported"):
        build_backbone("dinov2_vits14", tmp_path)


def test_hf_fused_parts_and_unknown_keys_are_named(tmp_path: Path) -> None:
    hf_state = to_hf_dinov2(build_backbone("vit_tiny_p14").state_dict())
    incomplete = {k: v for k, v in hf_state.items() if k != "encoder.layer.1.attention.attention.value.weight"}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight needs 3 parts.*query\.weight"):
        checkpoint_filter_fn(incomplete)
    with pytest.raises(ValueError, match=r"unrecognised keys.*encoder\.layer\.0\.extra\.weight"):
        checkpoint_filter_fn({**hf_state, "encoder.layer.0.extra.weight": torch.zeros(1)})

"""CLIP ViT vision tower: parity with transformers' CLIP models, the OpenAI / open_clip layout (state dict and
TorchScript archive), resampling, registry and error messages.

Reference models are built from tiny random configs (width 64, 3 blocks of 2 heads, patch 8 on a 32 px / 4 x 4
position table), with LayerNorms perturbed. Non-square inputs (5 x 7 tokens) exercise the position resampling against
transformers' `interpolate_pos_encoding=True`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers  # dev dependency: the reference implementations of the parity tests
from safetensors.torch import load_file
from torch import nn

from training.builders.backbones import ENCODERS, build_backbone, describe
from training.layers.export_mode import exportable
from training.models.clip import CLIPVisionTransformer
from training.weights.clip import (
    clip_checkpoint_filter_fn,
    detect_clip_source,
    load_clip_weights,
    to_hf_clip,
    to_openai_clip,
)

pytestmark = pytest.mark.timeout(60)

ATOL = 1e-4
IMAGE = 32
VISION = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": IMAGE,
    "patch_size": 8,
    "projection_dim": 24,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 99,
    "max_position_embeddings": 16,
    "bos_token_id": 0,
    "eos_token_id": 2,
}


def _perturb(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _hf(kind: str = "vision", seed: int = 0, **vision: object) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**VISION, **vision})
    if kind == "vision":
        return _perturb(transformers.CLIPVisionModel(config))
    if kind == "projection":
        return _perturb(transformers.CLIPVisionModelWithProjection(config))
    full = transformers.CLIPConfig(text_config=TEXT, vision_config=config.to_dict(), projection_dim=24)
    return _perturb(transformers.CLIPModel(full))


def _vision_tower(hf: nn.Module) -> nn.Module:
    return hf.vision_model if hasattr(hf, "vision_model") else hf


def _assert_matches_hf(ours: nn.Module, hf: nn.Module, size: tuple[int, int] = (IMAGE, IMAGE)) -> float:
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    interpolate = size != (IMAGE, IMAGE)
    with torch.no_grad():
        reference = _vision_tower(hf)(pixel_values=x, interpolate_pos_encoding=interpolate)
        out = ours.eval().forward_features(x)
    grid = (size[0] // 8, size[1] // 8)
    assert out["grid_size"] == grid and out["x_norm_patchtokens"].shape == (2, grid[0] * grid[1], 64)
    torch.testing.assert_close(out["x_norm_clstoken"], reference.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_norm_patchtokens"], reference.last_hidden_state[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["x_prenorm"], reference.last_hidden_state, atol=ATOL, rtol=0)
    return max(
        (out["x_norm_clstoken"] - reference.pooler_output).abs().max().item(),
        (out["x_norm_patchtokens"] - reference.last_hidden_state[:, 1:]).abs().max().item(),
    )


def _openai(hf: nn.Module, prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """A whole OpenAI CLIP state dict, written by hand from a transformers CLIPModel (independent of the key maps)."""
    sd = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items() if k.startswith("vision_model.")}
    out = {
        "conv1.weight": sd["embeddings.patch_embedding.weight"],
        "class_embedding": sd["embeddings.class_embedding"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_pre.weight": sd["pre_layrnorm.weight"],
        "ln_pre.bias": sd["pre_layrnorm.bias"],
        "ln_post.weight": sd["post_layernorm.weight"],
        "ln_post.bias": sd["post_layernorm.bias"],
        "proj": hf.state_dict()["visual_projection.weight"].T,
    }
    for i in range(VISION["num_hidden_layers"]):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [sd[f"{layer}self_attn.{n}_proj.{part}"] for n in "qkv"]
            out[f"{block}attn.in_proj_{part}"] = torch.cat(qkv)
            out[f"{block}attn.out_proj.{part}"] = sd[f"{layer}self_attn.out_proj.{part}"]
            out[f"{block}ln_1.{part}"] = sd[f"{layer}layer_norm1.{part}"]
            out[f"{block}ln_2.{part}"] = sd[f"{layer}layer_norm2.{part}"]
            out[f"{block}mlp.c_fc.{part}"] = sd[f"{layer}mlp.fc1.{part}"]
            out[f"{block}mlp.c_proj.{part}"] = sd[f"{layer}mlp.fc2.{part}"]
    whole = {prefix + k: v for k, v in out.items()}
    # The text tower of a whole CLIP model shares key names with the visual one; the loader must skip it.
    whole.update({"positional_embedding": torch.zeros(16, 32), "transformer.resblocks.0.ln_1.weight": torch.ones(32)})
    whole.update({"token_embedding.weight": torch.zeros(99, 32), "logit_scale": torch.ones(())})
    return whole


@pytest.mark.parametrize("kind", ["vision", "projection", "full"])
def test_hf_directory_matches_transformers(tmp_path: Path, kind: str) -> None:
    hf = _hf(kind)
    hf.save_pretrained(tmp_path)
    ours = build_backbone("clip_tiny", tmp_path)
    assert isinstance(ours, CLIPVisionTransformer)
    assert (ours.num_heads, ours.act, ours.output_dim) == (2, "quick_gelu", None if kind == "vision" else 24)
    _assert_matches_hf(ours, hf)
    _assert_matches_hf(ours, hf, (40, 56))  # 5 x 7 tokens from the 4 x 4 table
    if kind != "vision":  # the projected embedding: CLIPModel.get_image_features / image_embeds
        x = torch.randn(2, 3, IMAGE, IMAGE)
        with torch.no_grad():
            if kind == "full":
                reference = hf.get_image_features(pixel_values=x)
                reference = getattr(reference, "pooler_output", reference)
            else:
                reference = hf(pixel_values=x).image_embeds
            torch.testing.assert_close(ours(x), reference, atol=ATOL, rtol=0)


def test_gelu_config_is_read_from_hf(tmp_path: Path) -> None:
    hf = _hf(seed=1, hidden_act="gelu")
    hf.save_pretrained(tmp_path)
    ours = build_backbone("clip_tiny", tmp_path)
    assert ours.act == "gelu"
    _assert_matches_hf(ours, hf)


def test_openai_state_dict_matches_transformers(tmp_path: Path) -> None:
    hf = _hf("full", seed=2)
    path = tmp_path / "ViT-T-8.pt"
    torch.save(_openai(hf), path)
    loaded = load_clip_weights(path)
    assert loaded.source == "openai_clip"
    assert loaded.arch == {
        "img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 64, "depth": 3, "mlp_hidden_dim": 96,
        "output_dim": 24,
    }  # fmt: skip
    ours = build_backbone("clip_tiny", path)  # heads and activation come from the named variant
    _assert_matches_hf(ours, hf)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        reference = hf.get_image_features(pixel_values=x)
        torch.testing.assert_close(ours(x), getattr(reference, "pooler_output", reference), atol=ATOL, rtol=0)


def test_openai_torchscript_archive(tmp_path: Path) -> None:
    # OpenAI's released ViT-*.pt files are TorchScript archives of the whole model.
    hf = _hf("full", seed=3)
    root = _Holder()
    for key, tensor in _openai(hf).items():
        module = root
        *path, leaf = key.split(".")
        for name in path:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    path = tmp_path / "ViT-T-8.pt"
    torch.jit.save(torch.jit.script(root), str(path))
    _assert_matches_hf(build_backbone("clip_tiny", path), hf)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_open_clip_wrapped_gelu_checkpoint(tmp_path: Path) -> None:
    # open_clip training checkpoints: {"epoch", "state_dict": {"module.visual.*": ...}}; most open_clip ViTs use GELU.
    hf = _hf("full", seed=4, hidden_act="gelu")
    state = {"module." + k: v for k, v in _openai(hf).items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    ours = build_backbone("clip_tiny", tmp_path / "epoch_3.pt", act="gelu")
    assert ours.act == "gelu"
    _assert_matches_hf(ours, hf)


def test_mirrors_round_trip(tmp_path: Path) -> None:
    hf = _hf("full", seed=5)
    hf.save_pretrained(tmp_path)
    ours = load_clip_weights(tmp_path).state_dict
    saved = load_file(tmp_path / "model.safetensors")
    original = {k: v for k, v in saved.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    back = to_hf_clip(ours)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)
    openai = {k: v for k, v in _openai(hf).items() if k.startswith("visual.")}
    mirrored = to_openai_clip(ours)
    assert mirrored.keys() == openai.keys()
    assert all(torch.equal(mirrored[k], openai[k]) for k in openai)
    # Our own layout is a source too (idempotent filter).
    assert detect_clip_source(ours) == ("clip", "")
    assert clip_checkpoint_filter_fn(ours).keys() == ours.keys()


def test_source_detection() -> None:
    assert detect_clip_source({"vision_model.embeddings.class_embedding": 0}) == ("hf_clip", "vision_model.")
    assert detect_clip_source({"embeddings.class_embedding": 0}) == ("hf_clip", "")
    assert detect_clip_source({"visual.class_embedding": 0, "positional_embedding": 0}) == ("openai_clip", "visual.")
    with pytest.raises(ValueError, match="no CLIP vision tower found"):
        detect_clip_source({"visual.conv1.weight": 0, "visual.layer1.0.conv1.weight": 0})  # ResNet CLIP


def test_img_size_override_resamples_like_transformers(tmp_path: Path) -> None:
    hf = _hf(seed=6)
    hf.save_pretrained(tmp_path)
    ours = build_backbone("clip_tiny", tmp_path, img_size=48)
    assert ours.pos_embed.shape == (1, 1 + 36, 64)
    _assert_matches_hf(ours, hf, (48, 48))


def test_intermediates_head_and_export_mode() -> None:
    model = build_backbone("clip_tiny").eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out = model.forward_features(x)
        maps = model.forward_intermediates(x, 2)
        pairs = model.forward_intermediates(x, [0], reshape=False, norm=True, return_prefix_tokens=True)
        with exportable():
            explicit = model.forward_features(x)
    assert [m.shape for m in maps] == [(2, 64, 5, 7)] * 2
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), out["x_norm_patchtokens"])
    patches, prefix = pairs[0]
    assert patches.shape == (2, 35, 64) and prefix.shape == (2, 1, 64)
    assert out["x_norm_regtokens"].shape == (2, 0, 64)
    assert model.forward_head(out).shape == (2, 32)
    torch.testing.assert_close(model.forward_head(out, pre_logits=True), out["x_norm_clstoken"])
    torch.testing.assert_close(explicit["x_prenorm"], out["x_prenorm"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"41x56 is not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 41, 56))


# Vision-tower parameter counts of the OpenAI releases (with the projection).
PARAMS = {"clip_vitb32": 87_849_216, "clip_vitb16": 86_192_640, "clip_vitl14": 303_966_208}
HF_SIZES = {
    "clip_vitb32": {"patch_size": 32},
    "clip_vitb16": {"patch_size": 16},
    "clip_vitl14": {
        "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "projection_dim": 768,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(PARAMS))
def test_registry_sizes_match_transformers(name: str) -> None:
    with torch.device("meta"):
        ours = build_backbone(name)
        hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**HF_SIZES[name]))
    reference = {k: tuple(v.shape) for k, v in hf.state_dict().items() if "position_ids" not in k}
    mirrored = {k: tuple(v.shape) for k, v in to_hf_clip(ours.state_dict()).items()}
    assert mirrored == reference
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[name]
    assert ours.embed_dim // ours.num_heads == 64 and ours.act == "quick_gelu"
    assert "clip_vitl14_336" in ENCODERS


def test_describe_rebuilds_and_name_mismatch_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _hf("projection", seed=7).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.builders.backbones"):
        ours = build_backbone("clip_vitb16", tmp_path)
    assert "differs from clip_vitb16" in caplog.text and "embed_dim 768 -> 64" in caplog.text
    arch = describe(ours)
    assert arch["output_dim"] == 24 and arch["act"] == "quick_gelu" and arch["num_heads"] == 2
    build_backbone("clip_tiny", **arch).load_state_dict(ours.state_dict())  # strict


def test_unrecorded_heads_guessed_when_width_differs(tmp_path: Path) -> None:
    hf = _hf("full", seed=8)
    torch.save(_openai(hf), tmp_path / "clip.pt")
    assert build_backbone("clip_vitb16", tmp_path / "clip.pt").num_heads == 1  # 64-wide heads: 64 // 64
    assert build_backbone("clip_vitb16", tmp_path / "clip.pt", num_heads=2).num_heads == 2


def test_errors_name_file_key_and_shape(tmp_path: Path) -> None:
    hf = _hf("full", seed=9)
    state = _openai(hf)
    state["visual.ln_post.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "bad.pt")
    expected = r"bad\.pt: shape mismatch.*norm\.weight: checkpoint \(65,\), model expects \(64,\)"
    with pytest.raises(ValueError, match=expected):
        build_backbone("clip_tiny", tmp_path / "bad.pt")
    state = _openai(hf)
    state["visual.attnpool.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"unrecognised keys in a OpenAI / open_clip vision tower: \['attnpool"):
        build_backbone("clip_tiny", tmp_path / "odd.pt")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="holds Hugging Face CLIP keys: pass its directory"):
        load_clip_weights(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone("clip_tiny", tmp_path / "missing.pt")

"""ViT backbone: registry, shapes, forward API, export mode, layers (pos-embed / patch-embed resampling, blocks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.builders.backbones import BACKBONES, build_backbone
from training.layers.attention import Attention
from training.layers.block import Block
from training.layers.export_mode import exportable, is_exportable
from training.layers.mlp import SwiGLUFFN, swiglu_hidden_features
from training.layers.patch_embed import resample_patch_embed
from training.layers.pos_embed import resample_pos_embed
from training.models.vit import VisionTransformer

pytestmark = pytest.mark.timeout(60)

# Parameter counts of the released DINOv2 models without the pre-training mask token (dinov2 MODEL_CARD: 21M, 86M,
# 300M, 1,100M); registers add 4 x D.
PARAMS = {"dinov2_vits14": 22_056_192, "dinov2_vitb14": 86_579_712, "dinov2_vitl14": 304_367_616}
PARAMS["dinov2_vitg14"] = 1_136_479_232
WIDTHS = {"s": 384, "b": 768, "l": 1024, "g": 1536}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_registry_builds_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = build_backbone(name)
    assert all(p.is_meta for p in model.parameters())  # the big ones are never allocated
    count = sum(p.numel() for p in model.parameters())
    assert model.num_prefix_tokens == 1 + model.num_register_tokens
    if name.startswith("dinov2"):
        base = name.removesuffix("_reg")
        registers = 4 if name.endswith("_reg") else 0
        assert model.num_register_tokens == registers
        assert count == PARAMS[base] + registers * WIDTHS[base[-3]]
        assert model.patch_size == 14 and model.img_size == (518, 518)
        assert model.embed_dim // model.num_heads == 64
    else:
        assert count < 1_000_000


def test_vitg_uses_swiglu_and_dinov2_layout() -> None:
    with torch.device("meta"):
        model = build_backbone("dinov2_vitg14")
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (1536, 40, 24)
    block = model.blocks[0]
    assert isinstance(block.mlp, SwiGLUFFN)
    assert block.mlp.w12.weight.shape == (2 * 4096, 1536) and block.mlp.w3.weight.shape == (1536, 4096)
    assert block.attn.qkv.weight.shape == (3 * 1536, 1536)
    assert swiglu_hidden_features(1536 * 4) == 4096
    names = {name.split(".", 2)[2] for name, _ in model.named_parameters() if name.startswith("blocks.0.")}
    assert names == {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias",
        "ls2.gamma",
    }  # fmt: skip


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_huge'.*dinov2_vits14_reg.*vit_tiny_p8"):
        build_backbone("vit_huge")


@pytest.mark.parametrize(("name", "size"), [("vit_tiny_p8", (64, 96)), ("vit_tiny_p14", (70, 98))])
def test_tiny_forward_shapes(name: str, size: tuple[int, int]) -> None:
    model = build_backbone(name, num_register_tokens=2).eval()
    patch, dim = model.patch_size, model.embed_dim
    grid = (size[0] // patch, size[1] // patch)
    x = torch.randn(3, 3, *size)
    out = model.forward_features(x)
    assert out["x_norm_clstoken"].shape == (3, dim)
    assert out["x_norm_regtokens"].shape == (3, 2, dim)
    assert out["x_norm_patchtokens"].shape == (3, grid[0] * grid[1], dim)
    assert out["x_prenorm"].shape == (3, 3 + grid[0] * grid[1], dim)
    assert out["grid_size"] == grid == model.grid_size(*size)
    assert model.prepare_tokens(x).shape == (3, 3 + grid[0] * grid[1], dim)
    torch.testing.assert_close(model(x), out["x_norm_clstoken"])
    maps = model.forward_intermediates(x, 2)
    assert [m.shape for m in maps] == [(3, dim, *grid)] * 2
    # The last map is the final normalised patch tokens laid out on the grid (row-major).
    expected = out["x_norm_patchtokens"].transpose(1, 2).reshape(3, dim, *grid)
    torch.testing.assert_close(maps[-1], expected)


def test_forward_intermediates_options() -> None:
    model = build_backbone("vit_tiny_p8", num_register_tokens=4).eval()
    x = torch.randn(2, 3, 32, 48)
    tokens = model.prepare_tokens(x)
    per_block = []
    for block in model.blocks:
        tokens = block(tokens)
        per_block.append(tokens)
    raw = model.forward_intermediates(x, [-1, 1], norm=False, reshape=False)
    assert len(raw) == 2  # returned in block order: 1, then 3
    torch.testing.assert_close(raw[0], per_block[1][:, 5:])
    torch.testing.assert_close(raw[1], per_block[3][:, 5:])
    pairs = model.forward_intermediates(x, [0], return_prefix_tokens=True)
    patches, prefix = pairs[0]
    assert patches.shape == (2, 128, 4, 6) and prefix.shape == (2, 5, 128)
    torch.testing.assert_close(prefix, model.norm(per_block[0])[:, :5])
    with pytest.raises(ValueError, match="block index 4 is out of range for 4 blocks"):
        model.forward_intermediates(x, [4])
    with pytest.raises(ValueError, match="last 5 blocks"):
        model.forward_intermediates(x, 5)


def test_non_multiple_input_raises_with_nearest_sizes() -> None:
    model = build_backbone("vit_tiny_p14")
    with pytest.raises(ValueError, match=r"100x98 is not a multiple of the patch size 14.*98x98 or 112x98"):
        model.forward_features(torch.randn(1, 3, 100, 98))
    with pytest.raises(ValueError, match="not a multiple"):
        model.prepare_tokens(torch.randn(1, 3, 70, 90))
    with pytest.raises(ValueError, match="not a multiple"):
        model.forward_intermediates(torch.randn(1, 3, 13, 14))


def test_registers_follow_cls_and_carry_no_position() -> None:
    model = build_backbone("vit_tiny_p8", num_register_tokens=3)
    with torch.no_grad():
        model.register_tokens.normal_()
    x = torch.randn(2, 3, 32, 40)
    tokens = model.prepare_tokens(x)
    torch.testing.assert_close(tokens[:, 1:4], model.register_tokens.expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))


def test_export_mode_matches_fused_attention_on_a_built_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_backbone("vit_tiny_p14", num_register_tokens=4).eval()
    x = torch.randn(2, 3, 70, 98)
    with torch.no_grad():
        fused = model.forward_features(x)["x_prenorm"]
        assert not is_exportable()
        with exportable():
            assert is_exportable()
            # The flag is read at forward time: SDPA must not be called at all inside the context.
            monkeypatch.setattr(F, "scaled_dot_product_attention", _fail)
            explicit = model.forward_features(x)["x_prenorm"]
            monkeypatch.undo()
            with exportable(False):
                assert not is_exportable()
            assert is_exportable()
        assert not is_exportable()
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("fused attention used in export mode")


def test_exportable_restores_flag_after_error() -> None:
    with pytest.raises(RuntimeError), exportable():
        raise RuntimeError("boom")
    assert not is_exportable()


def test_attention_matches_torch_multihead_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        reference.in_proj_weight.copy_(attn.qkv.weight)  # q rows, then k, then v
        reference.in_proj_bias.copy_(torch.randn(96))
        attn.qkv.bias.copy_(reference.in_proj_bias)
        reference.out_proj.weight.copy_(attn.proj.weight)
        reference.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(3, 7, 32)
    expected, _ = reference(x, x, x, need_weights=False)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)
    with exportable():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)


class _CountingWrapper(nn.Module):
    """Stand-in for an adapter wrapper: same input and output shapes, wraps the original layer."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.base_layer(x)


def test_blocks_accept_stacked_task_streams_and_wrapped_linears() -> None:
    torch.manual_seed(0)
    block = Block(32, 4, 64, init_values=0.5).eval()
    streams = torch.randn(3, 2, 9, 32)  # T B N D
    stacked = block(streams.reshape(6, 9, 32))  # (T B) N D, task-major
    for task in range(3):
        torch.testing.assert_close(stacked[2 * task : 2 * task + 2], block(streams[task]), atol=1e-6, rtol=0)
    wrapped = {}
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        parent, child = name.split(".")
        wrapper = _CountingWrapper(getattr(getattr(block, parent), child))
        setattr(getattr(block, parent), child, wrapper)
        wrapped[name] = wrapper
    torch.testing.assert_close(block(streams[0]), stacked[:2], atol=1e-6, rtol=0)
    assert all(w.calls == 1 for w in wrapped.values())


def test_layer_scale_scales_residual_branches() -> None:
    block = Block(16, 2, 32, init_values=0.0)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(x), x)  # both branches multiplied by gamma = 0
    no_ls = Block(16, 2, 32, init_values=None)
    assert isinstance(no_ls.ls1, nn.Identity) and isinstance(no_ls.ls2, nn.Identity)


def test_resample_pos_embed_float_compute_dtype_and_prefix() -> None:
    torch.manual_seed(0)
    table = torch.randn(1, 2 + 16, 8)
    out = resample_pos_embed(table, (5, 7), num_prefix_tokens=2, antialias=True)
    assert out.shape == (1, 2 + 35, 8)
    torch.testing.assert_close(out[:, :2], table[:, :2])
    grid = table[:, 2:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(5, 7), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, 2:], expected)
    half = resample_pos_embed(table.to(torch.bfloat16), (5, 7), num_prefix_tokens=2, antialias=True)
    assert half.dtype == torch.bfloat16
    # Computed in float32 then rounded: equal to the fp32 result rounded to bf16 (the bf16 table is the rounded one).
    ref = resample_pos_embed(table.to(torch.bfloat16).float(), (5, 7), num_prefix_tokens=2, antialias=True)
    torch.testing.assert_close(half, ref.to(torch.bfloat16), atol=0, rtol=0)
    assert resample_pos_embed(table, (4, 4), num_prefix_tokens=2) is table
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 12, 8), (3, 4))
    rect = resample_pos_embed(torch.randn(1, 1 + 12, 8), (6, 8), old_size=(3, 4), interpolate_offset=0.1)
    assert rect.shape == (1, 1 + 48, 8)


def test_resample_pos_embed_conventions_differ_on_non_square_grids() -> None:
    table = torch.randn(1, 1 + 16, 8)
    variants = [
        resample_pos_embed(table, (5, 7), interpolate_offset=0.1),
        resample_pos_embed(table, (5, 7)),
        resample_pos_embed(table, (5, 7), antialias=True),
    ]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (variants[i] - variants[j]).abs().max() > 1e-3


def test_resample_patch_embed_is_exact_when_patches_grow() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 3, 8, 8)
    new = resample_patch_embed(weight, (12, 12))
    assert new.shape == (6, 3, 12, 12)
    patch = torch.randn(4, 3, 8, 8)
    grown = F.interpolate(patch, size=(12, 12), mode="bilinear", align_corners=False, antialias=True)
    # FlexiViT: <x, w> == <resize(x), w'> for every patch x.
    torch.testing.assert_close(F.conv2d(grown, new), F.conv2d(patch, weight), atol=1e-3, rtol=1e-4)
    assert resample_patch_embed(weight, (8, 8)) is weight


def test_patch_size_override_on_load(tmp_path) -> None:
    source = build_backbone("vit_tiny_p8")
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    model = build_backbone("vit_tiny_p8", tmp_path / "tiny.pth", patch_size=16, img_size=128)
    assert model.patch_embed.proj.weight.shape == (128, 3, 16, 16)
    assert model.pos_embed.shape == (1, 1 + 64, 128)


def test_own_checkpoint_round_trip_keeps_head_count(tmp_path) -> None:
    source = build_backbone("vit_tiny_p8", num_register_tokens=2).eval()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "own.pth")
    model = build_backbone("vit_tiny_p8", tmp_path / "own.pth", num_register_tokens=2).eval()
    # Not recorded in the weights, so taken from the matching variant: 4 heads (128 // 64 would be 2) and its
    # size-based, non-antialiased position resampling (a DINOv2 release with registers would antialias).
    assert model.num_heads == 4
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, False)
    x = torch.randn(1, 3, 40, 56)
    torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionTransformer(img_size=50, patch_size=14, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="ffn_layer 'moe'"):
        VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=1, num_heads=2, ffn_layer="moe")

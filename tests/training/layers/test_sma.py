"""SMA: patch unfolding layout, EMA shapes, identity at initialisation, trainability, export tracing."""

import pytest
import torch
from torch.export import Dim, export

from training.layers.sma import SMA, EfficientMultiScaleAttention, fold_patches, unfold_patches

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_unfold_layout_matches_definition():
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    ph, pw = 2, 4
    tokens = unfold_patches(x, (ph, pw))
    assert tokens.shape == (2 * ph * pw, 3, 3, 2)
    for b in range(2):
        for i in range(ph):
            for j in range(pw):
                p = i * pw + j
                # Position (i, j) inside every patch: rows i, i + ph, ...; columns j, j + pw, ...
                assert torch.equal(tokens[b * ph * pw + p], x[b, :, i::ph, j::pw])
    assert torch.equal(fold_patches(tokens, (ph, pw)), x)


def test_ema_keeps_shape_and_attends():
    ema = EfficientMultiScaleAttention(8, groups=2)
    x = torch.randn(3, 8, 5, 7)
    y = ema(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    # Output = input reweighted by a sigmoid gate in (0, 1), per group and pixel: same sign, smaller magnitude.
    assert torch.all(y * x >= 0) and torch.all(y.abs() <= x.abs())


def test_ema_rejects_bad_groups():
    with pytest.raises(ValueError, match="divisible by groups"):
        EfficientMultiScaleAttention(10, groups=4)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, 3, 16, 16), {}),
        ((2, 3, 15, 17), {}),  # not a multiple of the patch: padded and cropped
        ((1, 3, 9, 13), {"patch_size": (3, 2), "kernel_size": 3}),
        ((1, 4, 10, 12), {"in_chans": 4, "dim": 8, "groups": 2, "kernel_size": 5, "patch_size": (4, 4)}),
    ],
)
def test_identity_at_init(shape, kwargs):
    sma = SMA(**kwargs)
    x = torch.randn(shape)
    y = sma(x)
    assert y.shape == x.shape
    assert (y - x).abs().max().item() <= 1e-6


def test_trains_away_from_identity_and_reaches_every_parameter():
    sma = SMA(dim=8, groups=2)
    x = torch.randn(2, 3, 12, 14)
    target = torch.randn(2, 3, 12, 14)
    optimizer = torch.optim.Adam(sma.parameters(), lr=1e-2)
    attention_branch = [n for n, _ in sma.named_parameters() if not n.startswith("fusion.")]
    assert attention_branch  # local, expand, attention.*, project

    def step() -> dict[str, float]:
        optimizer.zero_grad()
        loss = (sma(x) - target).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.abs().sum().item() for n, p in sma.named_parameters()}
        optimizer.step()
        return grads

    before = sma(x).detach()
    first = step()
    # Step 1: only the fusion conv sees a gradient (its attention half is zero, blocking the branch).
    assert first["fusion.weight"] > 0
    assert all(first[n] == 0 for n in attention_branch)
    after = sma(x).detach()
    assert not torch.allclose(before, after)
    second = step()
    missing = [n for n in attention_branch if second[n] == 0]
    assert not missing, f"no gradient at step 2 for {missing}"


def test_identity_init_off_uses_default_fusion():
    sma = SMA(identity_init=False)
    x = torch.randn(1, 3, 8, 8)
    assert (sma(x) - x).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 4}, "odd"),
        ({"patch_size": (4, 2), "kernel_size": 3}, "h <= n"),
        ({"dim": 10, "groups": 4}, "divisible"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SMA(**kwargs)


def test_rejects_input_smaller_than_patch():
    with pytest.raises(ValueError, match="smaller than its patch"):
        SMA(patch_size=(2, 2))(torch.randn(1, 3, 1, 8))


def test_exports_with_dynamic_batch_and_size():
    sma = SMA(dim=8, groups=2).eval()
    torch.nn.init.normal_(sma.fusion.weight, std=0.1)  # leave the identity so the attention path is checked too
    dynamic = {0: Dim("batch", min=1, max=8), 2: 2 * Dim("half_h", min=2, max=64), 3: 2 * Dim("half_w", min=2, max=64)}
    program = export(sma, (torch.randn(2, 3, 12, 16),), dynamic_shapes={"x": dynamic})
    for shape in [(1, 3, 8, 10), (3, 3, 20, 12)]:
        x = torch.randn(shape)
        torch.testing.assert_close(program.module()(x), sma(x))

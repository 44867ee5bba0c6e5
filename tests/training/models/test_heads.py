"""Task heads: ASPP rate scaling, output shapes on several grids, batch-1 behaviour, gradient flow."""

import pytest
import torch

from training.models.heads import ASPP, ActivityHead, SegmentationHead, aspp_rates_for_grid

pytestmark = pytest.mark.timeout(60)

GRIDS = [(16, 16), (8, 12), (5, 3), (1, 7)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ((32, 32), (6, 12, 18)),  # DeepLabV3's own grid: unchanged
        ((64, 64), (12, 24, 36)),  # DeepLabV3's output-stride-8 rates
        ((16, 16), (3, 6, 9)),  # 224 px, patch 14
        ((16, 40), (3, 6, 9)),  # the shorter side decides
        ((8, 8), (2, 3, 5)),
        ((4, 4), (1, 2, 3)),  # 0.75 -> 1, 1.5 -> 2, 2.25 -> 2 raised to 3 to stay distinct
        ((2, 2), (1, 1, 1)),  # capped at side - 1: no distinct useful rates left
        ((1, 1), (1, 1, 1)),
    ],
)
def test_aspp_rates_for_grid(grid, expected):
    assert aspp_rates_for_grid(grid) == expected


def test_aspp_rates_custom_base_and_order():
    assert aspp_rates_for_grid((33, 33), base_rates=(12, 24, 36), base_grid=66) == (6, 12, 18)
    assert aspp_rates_for_grid((16, 16), base_rates=(18, 6, 12)) == (3, 6, 9)
    assert len(aspp_rates_for_grid((3, 3), base_rates=(6, 12, 18, 24))) == 4


@pytest.mark.parametrize(("grid", "base_rates"), [((0, 4), (6,)), ((4, 4), ()), ((4, 4), (0, 6))])
def test_aspp_rates_reject_bad_input(grid, base_rates):
    with pytest.raises(ValueError):
        aspp_rates_for_grid(grid, base_rates=base_rates)


@pytest.mark.parametrize("grid", GRIDS)
def test_segmentation_head_shapes(grid):
    head = SegmentationHead(12, 5, channels=8, rates=aspp_rates_for_grid(grid))
    features = torch.randn(2, 12, *grid)
    logits = head(features, output_size=(grid[0] * 14, grid[1] * 14 + 3))
    assert logits.shape == (2, 5, grid[0] * 14, grid[1] * 14 + 3)


@pytest.mark.parametrize("grid", GRIDS)
def test_activity_head_shapes(grid):
    head = ActivityHead(12, 4, channels=8, dropout=0.2)
    features = torch.randn(2, 12, *grid)
    assert head(features).shape == (2, 4)
    pooled = head(features, pre_logits=True)
    assert pooled.shape == (2, head.num_features) == (2, 8)
    head.eval()
    torch.testing.assert_close(head.fc(head(features, pre_logits=True)), head(features))


def test_activity_pooling_variants():
    features = torch.randn(2, 12, 3, 5)
    heads = {pool: ActivityHead(12, 4, channels=8, pool=pool).eval() for pool in ("avg", "max", "avgmax")}
    heads["max"].load_state_dict(heads["avg"].state_dict())
    conv = heads["avg"].conv(features).flatten(2)  # B c hw
    torch.testing.assert_close(heads["avg"](features, pre_logits=True), conv.mean(2))
    torch.testing.assert_close(heads["max"](features, pre_logits=True), conv.amax(2))
    both = heads["avgmax"]
    assert both.num_features == 16 and both.fc.in_features == 16
    assert both(features).shape == (2, 4)
    # A cue confined to one cell of the grid raises every max-pooled feature.
    heads["max"].conv[0].weight.data.abs_()
    heads["max"].conv[1].bias.data.zero_()
    spiked = features.clone()
    spiked[:, :, 1, 2] += 50.0
    change = heads["max"](spiked, pre_logits=True) - heads["max"](features, pre_logits=True)
    assert (change > 0).all()


def test_aspp_branches_and_output():
    aspp = ASPP(6, 10, rates=(1, 2, 3), dropout=0.0)
    assert len(aspp.branches) == 1 + 3 + 1  # 1x1, one per rate, image pooling
    assert aspp(torch.randn(2, 6, 7, 5)).shape == (2, 10, 7, 5)


def test_pooling_branch_is_constant_over_the_grid():
    aspp = ASPP(6, 4, rates=(1,))
    out = aspp.branches[-1](torch.randn(2, 6, 5, 3))
    assert out.shape == (2, 4, 5, 3)
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_one(mode):
    seg = SegmentationHead(12, 3, channels=8, rates=(1, 2))
    act = ActivityHead(12, 4, channels=8)
    for module in (seg, act):
        module.train(mode == "train")
    features = torch.randn(1, 12, 4, 6)
    assert seg(features, output_size=(56, 84)).shape == (1, 3, 56, 84)
    assert act(features).shape == (1, 4)


def test_gradients_reach_every_parameter_and_the_input():
    seg = SegmentationHead(12, 3, channels=8, rates=(1, 2), dropout=0.0)
    act = ActivityHead(12, 4, channels=8)
    features = torch.randn(2, 12, 6, 6, requires_grad=True)
    target_mask = torch.randint(0, 3, (2, 24, 24))
    loss = torch.nn.functional.cross_entropy(seg(features, output_size=(24, 24)), target_mask)
    loss = loss + torch.nn.functional.cross_entropy(act(features), torch.tensor([1, 3]))
    loss.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    for name, module in (("seg", seg), ("act", act)):
        missing = [n for n, p in module.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"{name}: no gradient for {missing}"


def test_heads_reject_bad_options():
    with pytest.raises(ValueError, match="rates"):
        ASPP(4, 4, rates=(0, 2))
    with pytest.raises(ValueError, match="dropout"):
        ActivityHead(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="pool"):
        ActivityHead(4, 2, pool="median")

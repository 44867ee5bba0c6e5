"""Every model family exposes its classification heads' pre-logit features (`forward_with_pre_logits`)."""

from __future__ import annotations

import pytest
import torch

from tests.export.test_bdta_export import SMALL as BDTA_SMALL
from tests.export.test_msam_export import SMALL as MSAM_SMALL
from tests.export.test_sak_export import SMALL as SAK_SMALL
from training.builders.registry import build_model
from training.config import load_config
from training.data.writer import synth_labels

FAMILIES = {
    "tiny": [
        "model.image_size=[64, 64]",
        "model.heads.segmentation_channels=16",
        "model.heads.activity_channels=16",
        "model.backbone.overrides={embed_dim: 32, depth: 2, num_heads: 2}",
    ],
    "tiny_bdta": BDTA_SMALL,
    "tiny_sak": SAK_SMALL,
    "tiny_msam": MSAM_SMALL,
}


@pytest.mark.parametrize("config", list(FAMILIES))
def test_pre_logits_feed_the_classifier(config: str) -> None:
    torch.manual_seed(0)
    model = build_model(load_config(config, FAMILIES[config]).model, synth_labels({}).to_dict()["tasks"]).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        logits, pre = model.forward_with_pre_logits(images)
        plain = model(images)
    assert set(pre) == {t for t, kind in model.task_kinds.items() if kind == "classification"} == {"activity"}
    assert pre["activity"].ndim == 2 and pre["activity"].shape[0] == 2
    for task in plain:
        assert torch.equal(logits[task], plain[task])
    # the features are what the classifier reads: a linear map of them gives the logits
    classifier = model.classifiers["activity"] if config == "tiny_msam" else model.heads["activity"].classify
    assert torch.allclose(classifier(pre["activity"]), plain["activity"], atol=1e-5)

"""`endostream bench train`: BDTA against the paper's baseline (one-stream LoRA on the same frozen backbone, heads of
the same shape, the shipped loss weighting), with adaptation parameters reported apart from head parameters."""

import pytest
import torch

from training.builders.registry import build_model
from training.jobs import train_cost
from training.models.heads import ProjectedHead

pytestmark = pytest.mark.timeout(120)

SMALL = ["model.image_size=[32, 32]", "model.heads.segmentation_channels=8", "model.heads.activity_channels=8"]


def test_bench_train_compares_with_the_fair_lora_baseline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(train_cost, "cpu_peak_supported", lambda: "not measured in tests")  # no child processes
    used = []
    monkeypatch.setattr(train_cost, "training_step", lambda model, batch, cfg: used.append(cfg) or (lambda: None))
    report = train_cost.bench_train_cost(
        bdta_config="tiny_bdta", lora_config="tiny", overrides=[*SMALL, "train.weighting=dbmtl"], steps=1, warmup=0
    )
    bdta, lora = report["bdta"], report["lora"]
    assert report["setup"]["lora"]["task_rank"] == 0  # one stream: no TESLA
    assert report["setup"]["weighting"] == "dbmtl" and [c.weighting for c in used] == ["dbmtl", "dbmtl"]
    assert report["setup"]["head_input_width"] == 64  # tiny_bdta's mote_dim
    assert bdta["head_params"] == lora["head_params"]  # same heads: the parameter ratio is the adaptation's
    assert bdta["trainable_params"] == bdta["adaptation_params"] + bdta["head_params"]
    assert lora["trainable_params"] == lora["adaptation_params"] + lora["head_params"]
    assert report["ratio"]["head_params"] == 1.0
    assert "peak_memory_mib" not in bdta


def test_training_step_uses_the_configured_weighting():
    from training.config import load_config
    from training.data.writer import synth_labels

    cfg = load_config("tiny", [*SMALL, "model.heads.input_dim=16", "train.weighting=dbmtl"])
    tasks = synth_labels({}).to_dict()["tasks"]
    model = build_model(cfg.model, tasks, load_backbone_weights=False)
    assert all(isinstance(head, ProjectedHead) for head in model.heads.values())
    assert train_cost.head_parameter_count(model) < sum(p.numel() for p in model.heads.parameters())
    batch = {
        "image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
        "activity": torch.tensor([0, 1]),
        "mask": torch.randint(0, 2, (2, 32, 32)),
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_cost.training_step(model, batch, cfg.train)()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

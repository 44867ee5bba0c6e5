"""Config resolution: shipped configs, inheritance, overrides, and errors that name the bad key."""

from pathlib import Path

import pytest
import yaml

from training.config import ExperimentConfig, available_configs, from_dict, load_config, write_config


def test_shipped_configs_resolve():
    assert {"tiny", "endoarss_vits14", "endoarss_vitb14"} <= set(available_configs())
    for name in available_configs():
        cfg = load_config(name)
        assert cfg.name == name
        assert isinstance(cfg.model.image_size, tuple)


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["train.epochs=3", "model.sma.enabled=false", "model.image_size=[96, 64]"])
    assert cfg.train.epochs == 3
    assert cfg.model.sma.enabled is False
    assert cfg.model.image_size == (96, 64)


def test_unknown_key_names_the_key():
    with pytest.raises(ValueError, match="train.epoch"):
        load_config("tiny", ["train.epoch=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config("tiny", ["train.epochs"])


def test_missing_config_lists_choices():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no_such_config")


def test_base_inheritance_and_round_trip(tmp_path: Path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "tiny", "train": {"epochs": 1}}))
    cfg = load_config(str(child))
    assert cfg.train.epochs == 1 and cfg.model.backbone.name == load_config("tiny").model.backbone.name
    write_config(cfg, tmp_path / "resolved.yaml")
    again = from_dict(ExperimentConfig, yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again == cfg


def test_defaults_follow_the_papers():
    """No paper clips gradients; TA-LoRA uses eq. 5 (squared norms), the §4.1 ranks, and eq. 6 in its configs."""
    cfg = load_config("tiny")
    assert cfg.optim.grad_clip is None
    assert cfg.model.adapters.orth_penalty == "squared"
    assert cfg.model.adapters.ta_lora_ranks == (32, 32, 8)
    assert load_config("msam_vitb").model.adapters.ta_lora_ranks == (32, 32, 8)
    for name in ("msam_vitb", "tiny_talora"):
        assert load_config(name).train.weighting == "weighted"
    # Checkpoints written before these defaults keep the values they were trained with.
    old = load_config("tiny", ["optim.grad_clip=1.0", "model.adapters.orth_penalty=norm"])
    assert old.optim.grad_clip == 1.0 and old.model.adapters.orth_penalty == "norm"


def test_mask_offset_and_limit_come_from_the_config(tmp_path):
    import numpy as np
    from PIL import Image

    from training.data.datasets import open_dataset

    for i in range(6):
        folder = tmp_path / "train" / ("a" if i < 3 else "b")
        (folder / "image").mkdir(parents=True, exist_ok=True)
        (folder / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "image" / f"{i}.png")
        raw = np.zeros((8, 8), np.uint8)
        raw[2:4, 2:4] = 2  # raw MTLESD style: class 1 stored as 2
        Image.fromarray(raw).save(folder / "mask" / f"{i}.png")
    cfg = load_config("tiny", [f"data.root={tmp_path}", "data.mask_offset=1", "data.limit=2"])
    dataset = open_dataset(cfg.data, "train")
    assert len(dataset) == 2 and sorted(dataset.activities) == [0, 1]  # evenly spaced: both activities kept
    assert dataset[0]["mask"].max() == 1
    with pytest.raises(ValueError, match="data.limit=0"):
        open_dataset(load_config("tiny", [f"data.root={tmp_path}", "data.limit=0"]).data, "train")

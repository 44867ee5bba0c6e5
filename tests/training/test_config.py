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

"""Session fixtures shared by the export and service tests: a tiny checkpoint, its bundle, a small dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.onnx_export import export_onnx
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def endoarss_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMA + shared LoRA + TESLA on 2 tasks, unmerged (the exporter folds the factors)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", [])


@pytest.fixture(scope="session")
def endoarss_bundle(endoarss_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    export_onnx(endoarss_ckpt, out, overwrite=True)
    return out


@pytest.fixture(scope="session")
def pt2_bundle(endoarss_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle exported with its torch program (`--torch-program`)."""
    out = tmp_path_factory.mktemp("pt2_bundle")
    export_onnx(endoarss_ckpt, out, overwrite=True, torch_program=True)
    return out


@pytest.fixture(scope="session")
def labelled_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated dataset (EndoARSS layout) for calibration and scoring."""
    from training.data.writer import synthesize_dataset

    root = tmp_path_factory.mktemp("data")
    synthesize_dataset(root, images=40, seed=4, height=96, width=96, progress=False)
    return root


@pytest.fixture(scope="session")
def temporal_bundle(endoarss_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle exported with an EMA temporal head (0.5, 0.1 s per step; tests/service/temporal_bundle.py)."""
    from tests.service.temporal_bundle import export_temporal_bundle

    return export_temporal_bundle(endoarss_ckpt, tmp_path_factory.mktemp("temporal") / "bundle")

"""Dataset readers: round trip on generated data, numbered MTLESD-style folders with mask offsets, EndoVis-18 colour
masks with CSV/JSON activity files, labels.json I/O, and errors that name the bad path or value."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from training.config import DataConfig
from training.data.datasets import (
    ENDOVIS18_ACTIVITIES,
    ENDOVIS18_COLORS,
    ENDOVIS18_INSTRUMENTS,
    EndoARSSFolder,
    EndoVis18,
    colors_to_index,
    open_dataset,
    open_dataset_at,
    read_activity_file,
)
from training.data.labels import LabelSpec, TaskSpec, read_labels, write_labels
from training.data.writer import synthesize_dataset


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen") / "data"
    synthesize_dataset(root, images=16, seed=1, height=64, width=64, progress=False)
    return root


def test_round_trip_on_generated_set(generated: Path):
    labels = read_labels(generated)
    summary = json.loads((generated / "summary.json").read_text())
    for split in ("train", "val", "test"):
        data = EndoARSSFolder(generated, split)
        assert len(data) == sum(summary["activities"][split].values())
        names = [data[i]["name"] for i in range(len(data))]
        assert len(set(names)) == len(names)
    data = EndoARSSFolder(generated, "train", cache=True)
    sample = data[0]
    folder, stem = sample["name"].split("/")
    assert labels.activity.classes[sample["activity"]] == folder
    on_disk = cv2.cvtColor(cv2.imread(str(generated / "train" / folder / "image" / f"{stem}.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(sample["image"], on_disk)
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (64, 64, 3)
    assert sample["mask"].shape == (64, 64) and sample["mask"].max() < labels.segmentation.num_classes
    assert data[0]["image"] is sample["image"]  # decoded once
    assert not sample["image"].flags.writeable
    assert data.activities == [data[i]["activity"] for i in range(len(data))]


def test_open_dataset_from_config(generated: Path):
    data = open_dataset(DataConfig(root=str(generated)), "val")
    assert isinstance(data, EndoARSSFolder) and len(data) > 0
    with pytest.raises(ValueError, match="data.root"):
        open_dataset(DataConfig(), "train")


def _numbered(root: Path) -> None:
    """MTLESD-style split with activity folders '1', '2' and masks that need `label[label > 0] -= 1`."""
    raw = np.array([[0, 1, 2], [3, 3, 0]], np.uint8)
    for activity in ("1", "2"):
        _png(root / "train" / activity / "image" / f"a{activity}.png", np.full((2, 3, 3), 9, np.uint8))
        _png(root / "train" / activity / "mask" / f"a{activity}.png", raw)


def test_numbered_folders_and_mask_offset(tmp_path: Path):
    _numbered(tmp_path)
    data = EndoARSSFolder(tmp_path, "train", mask_offset=1)
    assert data.activity_classes == ("1", "2")
    assert [data[i]["activity"] for i in range(2)] == [0, 1]
    assert data[0]["mask"].tolist() == [[0, 0, 1], [2, 2, 0]]
    assert EndoARSSFolder(tmp_path, "train")[0]["mask"].tolist() == [[0, 1, 2], [3, 3, 0]]
    mapped = EndoARSSFolder(tmp_path, "train", mask_mapping={0: 255, 1: 0, 2: 1, 3: 2})
    assert mapped[0]["mask"].tolist() == [[255, 0, 1], [2, 2, 255]]
    with pytest.raises(ValueError, match=r"\[3\] missing from mask_mapping"):
        EndoARSSFolder(tmp_path, "train", mask_mapping={0: 0, 1: 1, 2: 2})[0]
    spec = LabelSpec(
        (TaskSpec("activity", "classification", ("marking", "injection")), TaskSpec("seg", "segmentation", ("a", "b")))
    )
    named = EndoARSSFolder(tmp_path, "train", labels=spec, mask_offset=1)
    assert named.activity_classes == ("marking", "injection")
    with pytest.raises(ValueError, match="mask_offset"):  # values 2 exceed the 2 classes of the spec
        EndoARSSFolder(tmp_path, "train", labels=spec)[0]


def test_folder_errors_name_the_paths(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train"):
        EndoARSSFolder(tmp_path, "train")
    _numbered(tmp_path)
    _png(tmp_path / "train" / "1" / "image" / "lonely.png", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"lonely\.png has no mask: expected .*mask/lonely\.png"):
        EndoARSSFolder(tmp_path, "train")
    (tmp_path / "train" / "1" / "image" / "lonely.png").unlink()
    _png(tmp_path / "train" / "1" / "mask" / "a1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"a1\.png is 3x2 but its mask .*a1\.png is 4x4"):
        EndoARSSFolder(tmp_path, "train")[0]
    with pytest.raises(FileNotFoundError, match="valid"):
        EndoARSSFolder(tmp_path, "valid")


def _fake_endovis(root: Path) -> dict[str, np.ndarray]:
    """Two sequences with 2 frames each; returns the expected index masks by name."""
    colors = [c for _, c in ENDOVIS18_COLORS]
    expected = {}
    rng = np.random.default_rng(0)
    for seq in (1, 2):
        for frame in (0, 1):
            index = rng.integers(0, len(colors), (6, 8)).astype(np.uint8)
            _png(
                root / f"seq_{seq}" / "left_frames" / f"frame{frame:03d}.png", rng.integers(0, 255, (6, 8, 3), np.uint8)
            )
            _png(root / f"seq_{seq}" / "labels" / f"frame{frame:03d}.png", np.array(colors, np.uint8)[index])
            expected[f"seq_{seq}/frame{frame:03d}"] = index
    return expected


def test_endovis18_fake_set_loads(tmp_path: Path):
    expected = _fake_endovis(tmp_path)
    csv_file = tmp_path / "activities.csv"
    csv_file.write_text("seq,frame,activity\n1,0,suction\nseq_1,frame001,Suturing\n2,frame000.png,3\n")
    data = EndoVis18(tmp_path, [1, 2], csv_file, segmentation="scene")
    assert len(data) == 3  # seq_2/frame001 has no activity label
    by_name = {data[i]["name"]: data[i] for i in range(len(data))}
    assert set(by_name) == {"seq_1/frame000", "seq_1/frame001", "seq_2/frame000"}
    for name, sample in by_name.items():
        assert np.array_equal(sample["mask"], expected[name])
    assert by_name["seq_1/frame000"]["activity"] == ENDOVIS18_ACTIVITIES.index("suction")
    assert by_name["seq_1/frame001"]["activity"] == ENDOVIS18_ACTIVITIES.index("suturing")
    assert by_name["seq_2/frame000"]["activity"] == 3
    assert data.labels.segmentation.num_classes == 12
    json_file = tmp_path / "acts.json"
    json_file.write_text(json.dumps({"classes": ["a", "b"], "labels": {"seq_2": {"frame001": "b"}, "1/0": 0}}))
    classes, labels = read_activity_file(json_file)
    assert classes == ("a", "b") and labels == {(2, 1): 1, (1, 0): 0}
    assert len(EndoVis18(tmp_path, [2], json_file, segmentation="scene")) == 1
    (tmp_path / "splits.json").write_text(json.dumps({"train": [1], "test": [2]}))
    data = open_dataset_at(tmp_path, DataConfig(format="endovis18", endovis18_segmentation="scene"), "train")
    assert isinstance(data, EndoVis18) and len(data) == 2


def test_endovis18_errors(tmp_path: Path):
    _fake_endovis(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("seq,frame,activity\n1,0,juggling\n")
    with pytest.raises(ValueError, match="juggling"):
        EndoVis18(tmp_path, [1], bad, segmentation="scene")
    missing = tmp_path / "missing.csv"
    missing.write_text("seq,frame,activity\n1,7,idle\n")
    with pytest.raises(FileNotFoundError, match="frame007"):
        EndoVis18(tmp_path, [1], missing, segmentation="scene")
    with pytest.raises(FileNotFoundError, match="seq_9"):
        EndoVis18(tmp_path, [9], missing, segmentation="scene")
    mask = np.zeros((6, 8, 3), np.uint8)
    mask[2, 3] = (1, 2, 3)
    _png(tmp_path / "seq_1" / "labels" / "frame000.png", mask)
    good = tmp_path / "good.csv"
    good.write_text("seq,frame,activity\n1,0,idle\n")
    with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
        EndoVis18(tmp_path, [1], good, segmentation="scene")[0]
    with pytest.raises(FileNotFoundError, match="splits.json"):
        open_dataset_at(tmp_path, DataConfig(format="endovis18"), "train")


def test_endovis18_segments_the_7_mtlendovis_instruments_by_default(tmp_path: Path):
    expected = _fake_endovis(tmp_path)  # scene colour masks in labels/
    rng = np.random.default_rng(1)
    instruments = {}
    for name in expected:
        seq, frame = name.split("/")
        instruments[name] = rng.integers(0, len(ENDOVIS18_INSTRUMENTS), (6, 8)).astype(np.uint8)
        _png(tmp_path / seq / "instruments" / f"{frame}.png", instruments[name])
    csv_file = tmp_path / "activities.csv"
    csv_file.write_text("seq,frame,activity\n1,0,suction\n2,1,idle\n")
    data = EndoVis18(tmp_path, [1, 2], csv_file)
    assert data.labels.segmentation.classes == ENDOVIS18_INSTRUMENTS and len(ENDOVIS18_INSTRUMENTS) == 1 + 7
    for sample in (data[0], data[1]):
        np.testing.assert_array_equal(sample["mask"], instruments[sample["name"]])
    _png(tmp_path / "seq_1" / "instruments" / "frame000.png", np.full((6, 8), 9, np.uint8))
    with pytest.raises(ValueError, match="holds value 9"):
        EndoVis18(tmp_path, [1], csv_file)[0]
    with pytest.raises(ValueError, match="segmentation='parts'"):
        EndoVis18(tmp_path, [1], csv_file, segmentation="parts")


def test_colors_to_index_and_unknown_colour():
    colors = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]
    rgb = np.array([[[0, 0, 255], [255, 0, 0]], [[0, 0, 0], [0, 0, 255]]], np.uint8)
    assert colors_to_index(rgb, colors).tolist() == [[2, 1], [0, 2]]
    rgb[0, 0] = (7, 7, 7)
    with pytest.raises(ValueError, match=r"\(7, 7, 7\)"):
        colors_to_index(rgb, colors)


def test_labels_round_trip_and_validation(tmp_path: Path):
    spec = LabelSpec(
        (
            TaskSpec("activity", "classification", ("a", "b")),
            TaskSpec("segmentation", "segmentation", ("bg", "x"), ((0, 0, 0), (1, 2, 3))),
        ),
        source={"seed": 3},
    )
    path = write_labels(tmp_path, spec)
    assert path == tmp_path / "labels.json"
    assert read_labels(tmp_path) == spec and read_labels(path) == spec
    assert spec.activity.index("b") == 1 and spec.segmentation.colors[1] == (1, 2, 3)
    with pytest.raises(ValueError, match="2 classes but 1 colours"):
        TaskSpec("seg", "segmentation", ("bg", "x"), ((0, 0, 0),))
    with pytest.raises(ValueError, match="kind 'detection'"):
        TaskSpec("det", "detection", ("a",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        LabelSpec((TaskSpec("t", "classification", ("a",)), TaskSpec("t", "classification", ("b",))))
    with pytest.raises(FileNotFoundError, match="labels.json"):
        read_labels(tmp_path / "nowhere")

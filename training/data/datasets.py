"""Dataset readers. Each sample is a dict: `image` (H W 3 uint8 RGB), `mask` (H W uint8 class index, 255 =
ignore), `activity` (int) and `name` (str, unique within the dataset).

- `EndoARSSFolder`: the EndoARSS layout `root/<split>/<activity>/{image,mask}/<name>.png` (EndoARSS paper,
  section IV-A: MTLESD and MTLEndovis; also what `endostream data synth` writes). Activity folders are class names
  from labels.json or the numbers "1".."K" of the released datasets (index = number - 1). The released masks are
  index PNGs; the public EndoARSS code shifts them with `label[label > 0] -= 1` for some datasets, which is
  `mask_offset=1` here (default 0: our synthetic masks are stored as class indices). `mask_mapping` relabels raw
  values explicitly instead (e.g. {0: 255} to ignore a class).
- `EndoVis18`: the MICCAI 2018 Robotic Scene Segmentation release, `root/seq_N/left_frames/frameXXX.png`, segmented
  as MTLEndovis does by default (the 7 instrument types of `ENDOVIS18_INSTRUMENTS`, index masks in
  `root/seq_N/instruments/`), or by the challenge's 12 scene classes (colour masks in `root/seq_N/labels/`, mapped by
  `ENDOVIS18_COLORS`); activity labels come from a separate file (EndoVis-18-VQLA-Extend style), see
  `read_activity_file`.
"""

from __future__ import annotations

import abc
import csv
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
from PIL import Image

from training.data.labels import LABELS_FILE, LabelSpec, TaskSpec, read_labels

if TYPE_CHECKING:
    from training.config import DataConfig

logger = logging.getLogger(__name__)

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# EndoVis-18 scene segmentation classes and mask colours (RGB), as in the challenge release's labels.json.
ENDOVIS18_COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("background-tissue", (0, 0, 0)),
    ("instrument-shaft", (0, 255, 0)),
    ("instrument-clasper", (0, 255, 255)),
    ("instrument-wrist", (125, 255, 12)),
    ("kidney-parenchyma", (255, 55, 0)),
    ("covered-kidney", (24, 55, 125)),
    ("thread", (187, 155, 25)),
    ("clamps", (0, 255, 125)),
    ("suturing-needle", (255, 255, 125)),
    ("suction-instrument", (123, 15, 175)),
    ("small-intestine", (124, 155, 5)),
    ("ultrasound-probe", (12, 255, 141)),
)
# EndoVis-18 instrument types: background + the 7 instrument classes MTLEndovis segments (EndoARSS section IV-A).
# Index order of the instrument-type masks released for EndoVis-18 by ISINet (Gonzalez et al., MICCAI 2020), which
# are grey index PNGs, one per labelled frame; the EndoVis-18 challenge itself only labels scene classes.
ENDOVIS18_INSTRUMENTS: tuple[str, ...] = (
    "background",
    "bipolar_forceps",
    "prograsp_forceps",
    "large_needle_driver",
    "monopolar_curved_scissors",
    "ultrasound_probe",
    "suction_instrument",
    "clip_applier",
)
ENDOVIS18_MASK_DIRS = {"instrument": "instruments", "scene": "labels"}
# The 12 MTLEndovis activities (EndoARSS section IV-A, from EndoVis-18-VQLA-Extend), in the paper's order.
ENDOVIS18_ACTIVITIES: tuple[str, ...] = (
    "cauterization",
    "clipping",
    "cutting",
    "grasping",
    "idle",
    "looping",
    "manipulation",
    "retraction",
    "stapling",
    "suction",
    "suturing",
    "ultrasound sensing",
)


# ------------------------------------------------------------------------------------------------------ decoding
def read_image(path: Path) -> np.ndarray:
    """RGB uint8 H W 3 (grey images are expanded, alpha is dropped)."""
    data = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if data is None:
        raise RuntimeError(f"could not decode image {path}; is it a valid image file?")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def read_index_mask(path: Path) -> np.ndarray:
    """Index mask as uint8 H W: grey or palette PNGs give their values; RGB masks must have equal channels."""
    with Image.open(path) as image:
        mode = image.mode
        data = np.asarray(image)
    if data.ndim == 3:
        if data.shape[2] == 4:
            data = data[..., :3]
        if not (np.array_equal(data[..., 0], data[..., 1]) and np.array_equal(data[..., 0], data[..., 2])):
            raise ValueError(
                f"mask {path} is a colour image (mode {mode}); index masks need one channel. "
                "Colour-coded masks (EndoVis-18) are read with EndoVis18, which maps colours to classes"
            )
        data = data[..., 0]
    if data.max(initial=0) > 255:
        raise ValueError(f"mask {path} has values up to {int(data.max())}; class indices must fit in uint8")
    return data.astype(np.uint8)


def read_color_mask(path: Path) -> np.ndarray:
    """RGB uint8 H W 3 colour-coded mask (alpha dropped)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def colors_to_index(rgb: np.ndarray, colors: Sequence[tuple[int, int, int]], source: str = "mask") -> np.ndarray:
    """Map each pixel's colour to the index of that colour in `colors`; ValueError naming unknown colours."""
    table = np.array([(r << 16) | (g << 8) | b for r, g, b in colors], np.int64)
    order = np.argsort(table)
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    position = np.clip(np.searchsorted(table[order], keys), 0, len(table) - 1)
    known = table[order][position] == keys
    if not known.all():
        unknown = np.unique(keys[~known])[:8]
        names = [((int(k) >> 16) & 255, (int(k) >> 8) & 255, int(k) & 255) for k in unknown]
        raise ValueError(
            f"{source} holds colours not in the class colour table: {names}"
            f"{' (and more)' if len(unknown) == 8 else ''}; known colours: {list(colors)}"
        )
    return order[position].astype(np.uint8)


def _check_sizes(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is "
            f"{mask.shape[1]}x{mask.shape[0]}; masks must have the image's size"
        )


class _CachedDataset(abc.ABC):
    """Shared sample access with an optional in-memory cache of decoded arrays.

    With `cache=True` each sample is decoded once per process and kept (small images: ~260 KB per 256x256 pair).
    DataLoader workers each hold their own cache, which is rebuilt when workers restart every epoch; call
    `preload()` before building the loader (workers then inherit the arrays) or use `persistent_workers=True`.
    """

    transform: Transform | None
    cache: bool
    samples: list[tuple[Path, Path, int, str]]  # (image, mask, activity, name), filled by subclasses

    def __init__(self) -> None:
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded (image, mask) of sample `index`."""

    def _meta(self, index: int) -> tuple[int, str]:
        """(activity, name) of sample `index`, without decoding."""
        _, _, activity, name = self.samples[index]
        return activity, name

    def preload(self) -> None:
        """Decode every sample now (needs `cache=True`)."""
        if not self.cache:
            raise ValueError("preload() keeps decoded samples in memory; build the dataset with cache=True")
        for i in range(len(self)):
            self._arrays(i)

    def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        arrays = self._load(index)
        if self.cache:
            arrays[0].setflags(write=False)  # transforms must copy, never edit the cached arrays
            arrays[1].setflags(write=False)
            self._cache[index] = arrays
        return arrays

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        image, mask = self._arrays(index)
        activity, name = self._meta(index)
        sample: Sample = {"image": image, "mask": mask, "activity": activity, "name": name}
        return self.transform(sample) if self.transform is not None else sample

    def keep_evenly_spaced(self, limit: int) -> None:
        """Keep `limit` samples at evenly spaced positions (samples are grouped by activity, so every activity keeps
        its share); must be called before any sample is read."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"data.limit={limit!r} must be a positive number of frames (or null for all)")
        if self._cache:
            raise RuntimeError("keep_evenly_spaced() after samples were read would mix cached indices; call it first")
        if limit < len(self.samples):
            positions = np.linspace(0, len(self.samples) - 1, limit).round().astype(int)
            self.samples = [self.samples[i] for i in positions]

    @property
    def activities(self) -> list[int]:
        """Activity label of every sample (for class counts or stratified sampling)."""
        return [self._meta(i)[0] for i in range(len(self))]


# ------------------------------------------------------------------------------------------------- EndoARSS layout
class EndoARSSFolder(_CachedDataset):
    """`root/<split>/<activity>/{image,mask}/<name>.<ext>` with index masks.

    Args:
        root: dataset folder (holding the split folders and, usually, labels.json).
        split: split folder name, e.g. "train".
        labels: class names; default: root/labels.json if present, else the activity folder names.
        transform: callable applied to every sample dict.
        mask_offset: subtracted from every non-zero mask value (1 = the public code's `label[label > 0] -= 1`).
        mask_mapping: explicit raw value -> class index table, applied after `mask_offset`; raw values missing
            from it raise an error (map them to 255 to ignore them).
        cache: keep decoded arrays in memory (see `preload`).
    """

    def __init__(
        self,
        root: Path | str,
        split: str,
        labels: LabelSpec | None = None,
        transform: Transform | None = None,
        *,
        mask_offset: int = 0,
        mask_mapping: Mapping[int, int] | None = None,
        cache: bool = False,
    ) -> None:
        super().__init__()
        self.root, self.split = Path(root), split
        self.transform, self.cache = transform, cache
        self.mask_offset = int(mask_offset)
        if not 0 <= self.mask_offset < 255:
            raise ValueError(f"mask_offset must be in 0..254; got {mask_offset}")
        self._lut = self._mapping_table(mask_mapping)
        split_dir = self.root / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
            raise FileNotFoundError(f"split folder {split_dir} not found; folders in {self.root}: {available}")
        if labels is None and (self.root / LABELS_FILE).is_file():
            labels = read_labels(self.root)
        self.labels = labels
        folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not folders:
            raise FileNotFoundError(f"{split_dir} holds no activity folders (<activity>/image, <activity>/mask)")
        self.activity_classes, folder_index = self._activity_index(folders)
        self.samples: list[tuple[Path, Path, int, str]] = []
        for folder in folders:
            self.samples += self._scan(split_dir / folder, folder_index[folder])
        if not self.samples:
            raise FileNotFoundError(f"no images found under {split_dir}/*/image")
        num_classes = self.labels.segmentation.num_classes if self._has_segmentation() else None
        self.num_segmentation_classes = num_classes

    def _has_segmentation(self) -> bool:
        return self.labels is not None and any(t.kind == "segmentation" for t in self.labels.tasks)

    @staticmethod
    def _mapping_table(mapping: Mapping[int, int] | None) -> np.ndarray | None:
        if mapping is None:
            return None
        table = np.full(256, -1, np.int16)
        for raw, target in mapping.items():
            if not (0 <= int(raw) <= 255 and 0 <= int(target) <= 255):
                raise ValueError(f"mask_mapping entry {raw}: {target} is outside 0..255")
            table[int(raw)] = int(target)
        return table

    def _activity_index(self, folders: list[str]) -> tuple[tuple[str, ...], dict[str, int]]:
        numeric = all(f.isdigit() for f in folders)
        if self.labels is not None:
            classes = self.labels.activity.classes
            index = {}
            for folder in folders:
                if folder in classes:
                    index[folder] = classes.index(folder)
                elif numeric and 1 <= int(folder) <= len(classes):
                    index[folder] = int(folder) - 1
                else:
                    raise ValueError(
                        f"activity folder {self.root / self.split / folder} is neither a class of labels.json "
                        f"{list(classes)} nor a number 1..{len(classes)}"
                    )
            return classes, index
        if numeric:
            if any(int(f) < 1 for f in folders):
                raise ValueError(f"numbered activity folders start at 1; found {folders} in {self.root / self.split}")
            count = max(int(f) for f in folders)
            return tuple(str(i) for i in range(1, count + 1)), {f: int(f) - 1 for f in folders}
        logger.warning("%s has no labels.json: activity classes are the folder names %s", self.root, folders)
        return tuple(folders), {f: i for i, f in enumerate(folders)}

    def _scan(self, folder: Path, activity: int) -> list[tuple[Path, Path, int, str]]:
        image_dir, mask_dir = folder / "image", folder / "mask"
        if not image_dir.is_dir() or not mask_dir.is_dir():
            raise FileNotFoundError(f"{folder} needs both an image/ and a mask/ folder")
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        out = []
        for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            mask_path = masks.get(image_path.stem)
            if mask_path is None:
                raise FileNotFoundError(
                    f"image {image_path} has no mask: expected {mask_dir / (image_path.stem + '.png')}"
                )
            out.append((image_path, mask_path, activity, f"{folder.name}/{image_path.stem}"))
        return out

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path, _, _ = self.samples[index]
        image, mask = read_image(image_path), read_index_mask(mask_path)
        _check_sizes(image, mask, image_path, mask_path)
        if self.mask_offset:
            mask = np.where(mask > 0, np.maximum(mask.astype(np.int16) - self.mask_offset, 0), 0).astype(np.uint8)
        if self._lut is not None:
            mapped = self._lut[mask]
            if (mapped < 0).any():
                missing = sorted(int(v) for v in np.unique(mask[mapped < 0]))
                raise ValueError(f"mask {mask_path} holds values {missing} missing from mask_mapping")
            mask = mapped.astype(np.uint8)
        if self.num_segmentation_classes is not None:
            bad = (mask >= self.num_segmentation_classes) & (mask != IGNORE_INDEX)
            if bad.any():
                values = sorted(int(v) for v in np.unique(mask[bad]))
                raise ValueError(
                    f"mask {mask_path} holds values {values} but labels.json lists "
                    f"{self.num_segmentation_classes} classes; set mask_offset / mask_mapping for this dataset"
                )
        return image, mask


# --------------------------------------------------------------------------------------------------- EndoVis-18
def _parse_frame_key(seq: Any, frame: Any, source: str) -> tuple[int, int]:
    match_seq = re.fullmatch(r"(?:seq_?)?(\d+)", str(seq).strip())
    match_frame = re.fullmatch(r"(?:frame)?(\d+)(?:\.png)?", str(frame).strip())
    if not match_seq or not match_frame:
        raise ValueError(
            f"{source}: cannot read sequence {seq!r} / frame {frame!r} (use e.g. 2 / 15 or seq_2 / frame015)"
        )
    return int(match_seq.group(1)), int(match_frame.group(1))


def _activity_value(value: Any, classes: Sequence[str], source: str) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < len(classes):
            raise ValueError(f"{source}: activity index {index} outside 0..{len(classes) - 1}")
        return index
    name = str(value).strip()
    lowered = [c.lower() for c in classes]
    if name.lower() not in lowered:
        raise ValueError(f"{source}: unknown activity {name!r}; classes: {list(classes)}")
    return lowered.index(name.lower())


def read_activity_file(
    path: Path | str, classes: Sequence[str] | None = None
) -> tuple[tuple[str, ...], dict[tuple[int, int], int]]:
    """Read frame-level activity labels: returns (class names, {(sequence, frame): class index}).

    Accepted formats:
      - CSV with a header holding `seq`, `frame` and `activity` columns; `seq` is `2` or `seq_2`, `frame` is `15`,
        `frame015` or `frame015.png`, `activity` is a class name (case-insensitive) or a 0-based index.
      - JSON object `{"classes": [...] (optional), "labels": {"seq_2/frame015": "suction", ...}}`; a key may also
        be `"2/15"`, and the labels may be nested as `{"seq_2": {"frame015": "suction"}}`.
    Classes default to the 12 MTLEndovis activities (`ENDOVIS18_ACTIVITIES`); a JSON `classes` list overrides them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"activity file {path} not found (CSV seq,frame,activity or JSON; see docstring)")
    labels: dict[tuple[int, int], int] = {}
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "labels" not in data:
            raise ValueError(f"{path}: expected a JSON object with a 'labels' mapping (and optional 'classes')")
        classes = tuple(data.get("classes") or classes or ENDOVIS18_ACTIVITIES)
        for key, value in data["labels"].items():
            if isinstance(value, dict):
                for frame, activity in value.items():
                    labels[_parse_frame_key(key, frame, str(path))] = _activity_value(activity, classes, str(path))
            else:
                if "/" not in key:
                    raise ValueError(f"{path}: label key {key!r} must look like 'seq_2/frame015'")
                seq, frame = key.split("/", 1)
                labels[_parse_frame_key(seq, frame, str(path))] = _activity_value(value, classes, str(path))
        return classes, labels
    classes = tuple(classes or ENDOVIS18_ACTIVITIES)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip().lower(): f for f in reader.fieldnames or []}
        missing = [c for c in ("seq", "frame", "activity") if c not in fields]
        if missing:
            raise ValueError(f"{path}: CSV header {reader.fieldnames} lacks {missing}; need seq,frame,activity")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            key = _parse_frame_key(row[fields["seq"]], row[fields["frame"]], where)
            labels[key] = _activity_value(row[fields["activity"]], classes, where)
    return classes, labels


class EndoVis18(_CachedDataset):
    """EndoVis-18 frames with activity labels and instrument-type (MTLEndovis) or scene segmentation masks.

    The frames listed in `activity_file` for `split_sequences` form the dataset (frames without an activity label
    are skipped); each must have `seq_N/left_frames/frameXXX.png` and its mask: `seq_N/instruments/frameXXX.png`
    (grey index PNG over `ENDOVIS18_INSTRUMENTS`, the 7 instrument classes + background that MTLEndovis segments)
    for `segmentation="instrument"`, or the challenge's colour mask `seq_N/labels/frameXXX.png` over the 12
    `ENDOVIS18_COLORS` scene classes for `segmentation="scene"`.

    Args:
        root: folder holding the `seq_N` folders.
        split_sequences: sequence numbers of this split, e.g. [1, 2, 3].
        activity_file: CSV or JSON activity labels (see `read_activity_file`).
        transform: callable applied to every sample dict.
        activity_classes: class names when the file does not name them (default: the 12 MTLEndovis activities).
        segmentation: "instrument" (MTLEndovis, default) or "scene" (the challenge's 12 classes).
        cache: keep decoded arrays in memory.
    """

    def __init__(
        self,
        root: Path | str,
        split_sequences: Sequence[int],
        activity_file: Path | str,
        transform: Transform | None = None,
        *,
        activity_classes: Sequence[str] | None = None,
        segmentation: Literal["instrument", "scene"] = "instrument",
        cache: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.transform, self.cache = transform, cache
        if segmentation not in ENDOVIS18_MASK_DIRS:
            raise ValueError(f"EndoVis-18 segmentation={segmentation!r}; choose one of {sorted(ENDOVIS18_MASK_DIRS)}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"EndoVis-18 folder {self.root} not found")
        classes, labels = read_activity_file(activity_file, activity_classes)
        self.activity_classes = classes
        self.segmentation = segmentation
        if segmentation == "scene":
            self.colors: tuple[tuple[int, int, int], ...] | None = tuple(c for _, c in ENDOVIS18_COLORS)
            seg_task = TaskSpec("segmentation", "segmentation", tuple(n for n, _ in ENDOVIS18_COLORS), self.colors)
        else:
            self.colors = None
            seg_task = TaskSpec("segmentation", "segmentation", ENDOVIS18_INSTRUMENTS)
        self.labels = LabelSpec(
            tasks=(TaskSpec("activity", "classification", classes), seg_task),
            source={"dataset": "EndoVis-18", "activity_file": str(activity_file), "segmentation": segmentation},
        )
        mask_dir = ENDOVIS18_MASK_DIRS[segmentation]
        self.samples: list[tuple[Path, Path, int, str]] = []
        for seq in split_sequences:
            seq_dir = self.root / f"seq_{int(seq)}"
            if not seq_dir.is_dir():
                available = sorted(p.name for p in self.root.glob("seq_*"))
                raise FileNotFoundError(f"sequence folder {seq_dir} not found; available: {available}")
            keys = sorted(k for k in labels if k[0] == int(seq))
            if not keys:
                logger.warning("%s has no activity labels in %s; skipped", seq_dir, activity_file)
            for _, frame in keys:
                image_path = seq_dir / "left_frames" / f"frame{frame:03d}.png"
                mask_path = seq_dir / mask_dir / f"frame{frame:03d}.png"
                for p in (image_path, mask_path):
                    if not p.is_file():
                        raise FileNotFoundError(f"{activity_file} labels seq_{seq} frame {frame}, but {p} is missing")
                self.samples.append((image_path, mask_path, labels[(int(seq), frame)], f"seq_{seq}/frame{frame:03d}"))
        if not self.samples:
            raise ValueError(f"no labelled frames for sequences {list(split_sequences)} in {activity_file}")

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path, _, _ = self.samples[index]
        image = read_image(image_path)
        if self.colors is not None:
            mask = colors_to_index(read_color_mask(mask_path), self.colors, str(mask_path))
        else:
            mask = read_index_mask(mask_path)
            if mask.max(initial=0) >= len(ENDOVIS18_INSTRUMENTS):
                raise ValueError(
                    f"instrument mask {mask_path} holds value {int(mask.max())}, outside 0.."
                    f"{len(ENDOVIS18_INSTRUMENTS) - 1} ({', '.join(ENDOVIS18_INSTRUMENTS)}); scene colour masks need "
                    "data.endovis18_segmentation=scene"
                )
        _check_sizes(image, mask, image_path, mask_path)
        return image, mask


# ------------------------------------------------------------------------------------------------ from a config
ENDOVIS18_SPLITS_FILE = "splits.json"
ENDOVIS18_ACTIVITY_FILES = ("activities.csv", "activities.json")


def open_dataset_at(root: Path | str, cfg: DataConfig, split: str) -> EndoARSSFolder | EndoVis18:
    """The dataset of `split` under `root` in the format `cfg.format`.

    `data.limit` keeps that many evenly spaced frames (`keep_evenly_spaced`). `endoarss`: `root/<split>/...` with
    `root/labels.json`, masks shifted by `data.mask_offset`. `endovis18`: `root/splits.json` maps split names to
    sequence lists (`{"train": [1, 2, ...], "val": [...]}`) and `root/activities.csv` (or `.json`) holds the labels.
    """
    dataset = _open_format(Path(root), cfg, split)
    if cfg.limit is not None:
        dataset.keep_evenly_spaced(cfg.limit)
    return dataset


def _open_format(root: Path, cfg: DataConfig, split: str) -> EndoARSSFolder | EndoVis18:
    if cfg.format == "endoarss":
        return EndoARSSFolder(root, split, cache=cfg.cache, mask_offset=cfg.mask_offset)
    if cfg.mask_offset:
        raise ValueError(
            f"data.mask_offset={cfg.mask_offset} applies to index masks (data.format=endoarss); EndoVis-18 colour "
            "masks are mapped by colour, so set data.mask_offset=0"
        )
    if cfg.format == "endovis18":
        splits_path = root / ENDOVIS18_SPLITS_FILE
        if not splits_path.is_file():
            raise FileNotFoundError(
                f"{splits_path} not found: for data.format=endovis18 write it as "
                '{"train": [1, 2, 3], "val": [4], "test": [5]} (sequence numbers per split)'
            )
        splits = json.loads(splits_path.read_text())
        if split not in splits:
            raise ValueError(f"split {split!r} not in {splits_path}; splits: {sorted(splits)}")
        activity_file = next((root / n for n in ENDOVIS18_ACTIVITY_FILES if (root / n).is_file()), None)
        if activity_file is None:
            raise FileNotFoundError(f"no activity labels in {root}: add one of {ENDOVIS18_ACTIVITY_FILES}")
        return EndoVis18(root, splits[split], activity_file, segmentation=cfg.endovis18_segmentation, cache=cfg.cache)
    raise ValueError(f"data.format {cfg.format!r} is not supported; choose 'endoarss' or 'endovis18'")


def open_dataset(cfg: DataConfig, split: str) -> EndoARSSFolder | EndoVis18:
    """`open_dataset_at(cfg.root, cfg, split)`."""
    if cfg.root is None:
        raise ValueError("data.root is not set: pass --data DIR (a folder made by `endostream data synth`)")
    return open_dataset_at(cfg.root, cfg, split)

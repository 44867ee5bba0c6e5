"""Task and class descriptions of a dataset, stored as `labels.json` at the dataset root.

Schema (what `endostream data synth` writes, and what training and checkpoints carry along)::

    {
      "tasks": [
        {"name": "activity", "kind": "classification", "classes": ["grasping", ...]},
        {"name": "segmentation", "kind": "segmentation", "classes": ["background", ...],
         "colors": [[0, 0, 0], ...]}
      ],
      "source": {...free-form provenance: generator, parameters, seed...}
    }

Task names are the string keys used everywhere else (model heads, losses, metrics). `colors` (RGB, one per class)
is optional and only meaningful for segmentation tasks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"

TaskKind = Literal["classification", "segmentation"]
TASK_KINDS: tuple[str, ...] = ("classification", "segmentation")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, kind and class names (plus display colours for segmentation)."""

    name: str = field(metadata={"help": "task key, e.g. 'activity' or 'segmentation'"})
    kind: TaskKind = field(metadata={"help": "'classification' (one label per frame) or 'segmentation' (per pixel)"})
    classes: tuple[str, ...] = field(metadata={"help": "class names; the index is the label value"})
    colors: tuple[tuple[int, int, int], ...] | None = field(
        default=None, metadata={"help": "RGB colour per class, for masks drawn in colour"}
    )

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("task name is empty; give each task a non-empty name such as 'activity'")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r} has kind {self.kind!r}; expected one of {TASK_KINDS}")
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise ValueError(f"task {self.name!r} lists no classes")
        duplicates = sorted({c for c in classes if classes.count(c) > 1})
        if duplicates:
            raise ValueError(f"task {self.name!r} lists classes more than once: {duplicates}")
        object.__setattr__(self, "classes", classes)
        if self.colors is not None:
            colors = tuple(tuple(int(v) for v in c) for c in self.colors)
            if len(colors) != len(classes):
                raise ValueError(
                    f"task {self.name!r} has {len(classes)} classes but {len(colors)} colours; give one RGB per class"
                )
            bad = [c for c in colors if len(c) != 3 or not all(0 <= v <= 255 for v in c)]
            if bad:
                raise ValueError(f"task {self.name!r} has colours that are not RGB triples in 0..255: {bad}")
            object.__setattr__(self, "colors", colors)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, class_name: str) -> int:
        """Label value of `class_name`; ValueError naming the known classes otherwise."""
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise ValueError(f"task {self.name!r} has no class {class_name!r}; classes: {list(self.classes)}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "classes": list(self.classes)}
        if self.colors is not None:
            out["colors"] = [list(c) for c in self.colors]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        missing = [k for k in ("name", "kind", "classes") if k not in data]
        if missing:
            raise ValueError(f"task entry {data!r} lacks {missing}; each task needs name, kind and classes")
        colors = data.get("colors")
        return cls(
            name=str(data["name"]),
            kind=data["kind"],
            classes=tuple(data["classes"]),
            colors=tuple(tuple(c) for c in colors) if colors is not None else None,
        )


@dataclass(frozen=True)
class LabelSpec:
    """All tasks of a dataset plus free-form provenance (`source`)."""

    tasks: tuple[TaskSpec, ...]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks = tuple(self.tasks)
        if not tasks:
            raise ValueError("a label spec needs at least one task")
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")
        object.__setattr__(self, "tasks", tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"no task named {name!r}; tasks: {list(self.task_names)}")

    def first(self, kind: TaskKind) -> TaskSpec:
        """The first task of `kind` (datasets here have one classification and one segmentation task)."""
        for t in self.tasks:
            if t.kind == kind:
                return t
        raise ValueError(f"no {kind} task; tasks: {[(t.name, t.kind) for t in self.tasks]}")

    @property
    def activity(self) -> TaskSpec:
        return self.first("classification")

    @property
    def segmentation(self) -> TaskSpec:
        return self.first("segmentation")

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [t.to_dict() for t in self.tasks], "source": dict(self.source)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSpec:
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
            raise ValueError('labels must be a JSON object with a "tasks" list')
        return cls(tasks=tuple(TaskSpec.from_dict(t) for t in data["tasks"]), source=dict(data.get("source") or {}))


def _labels_path(root: Path) -> Path:
    root = Path(root)
    return root if root.suffix == ".json" else root / LABELS_FILE


def read_labels(root: Path | str) -> LabelSpec:
    """Read `root/labels.json` (or `root` itself when it is a .json file)."""
    path = _labels_path(Path(root))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a dataset folder needs a labels.json naming its tasks and classes "
            "(`endostream data synth` writes one; see training/data/labels.py for the schema)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    try:
        return LabelSpec.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def write_labels(root: Path | str, spec: LabelSpec) -> Path:
    """Write `spec` to `root/labels.json` (or to `root` when it is a .json path); returns the file path."""
    path = _labels_path(Path(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return path

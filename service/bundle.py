"""Reading a bundle (`manifest.json` + `model.onnx`, optionally `model.pt2` and TensorRT engines) without torch.

The manifest format is the exporter's contract (export/manifest.py writes it); the service parses it with its own
pydantic models so a malformed or tampered bundle is refused with an error that names the field or the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUPPORTED_FORMAT = 1
MANIFEST_FILE = "manifest.json"
TORCH_PROGRAM_FILE = "model.pt2"  # torch.export program, written by `endostream export onnx --torch-program`


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    layout: Literal["NHWC"]
    dtype: Literal["uint8"]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    color_order: Literal["RGB"]
    max_batch: int | None = Field(None, gt=0)


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    kind: Literal["classification", "segmentation"]
    classes: list[str]
    output: str
    colors: list[list[int]] | None = None
    logits_output: str | None = None
    features_output: str | None = None  # pre-logit features (bundles with a learned temporal head)


class TemporalSpec(BaseModel):
    """`manifest.temporal`: a head that turns the per-frame stream of one classification task into an online answer.

    One call of `graph` is one step of `frame_interval_s` source time; README "Temporal activity in results".
    """

    model_config = ConfigDict(extra="ignore")

    task: str
    method: str = Field(description="what was exported: tcn, gru, ema, hmm")
    graph: str
    input_output: str = Field(description="the main-graph output that feeds the head, e.g. activity_features")
    input_dim: int = Field(gt=0)
    state_shape: list[int] = Field(min_length=1)
    frame_interval_s: float = Field(gt=0)
    receptive_field_frames: int = Field(ge=1)
    parity_max_abs_diff: float | None = None
    graph_sha256: str | None = None  # required; None is refused with a message that names it


class ManifestModel(BaseModel):
    """The fields of `manifest.json` the service relies on (unknown fields are kept in `checks`/`engines`)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    format_version: int
    family: str
    name: str
    tasks: list[TaskSpec]
    input: InputSpec
    precision: str
    opset: int
    model_file: str
    model_sha256: str
    checkpoint_sha256: str
    created: str
    exporter_version: str
    checks: dict[str, Any] = {}
    engines: list[dict[str, Any]] = []
    temporal: TemporalSpec | None = None


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder."""

    path: Path
    manifest: ManifestModel
    raw_manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def temporal_graph_path(self) -> Path | None:
        temporal = self.manifest.temporal
        return None if temporal is None else self.path / temporal.graph

    @property
    def torch_program_path(self) -> Path | None:
        path = self.path / TORCH_PROGRAM_FILE
        return path if path.is_file() else None

    @property
    def version(self) -> str:
        """Short content version: the first 12 hex digits of the graph's sha256."""
        return self.manifest.model_sha256[:12]

    def task(self, name: str) -> TaskSpec:
        for task in self.manifest.tasks:
            if task.name == name:
                return task
        raise KeyError(f"task {name!r} is not in bundle {self.path} (tasks: {[t.name for t in self.manifest.tasks]})")

    def task_of_kind(self, kind: str) -> TaskSpec | None:
        """The first task of `kind` ("classification" | "segmentation"), None when the bundle has none."""
        return next((t for t in self.manifest.tasks if t.kind == kind), None)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: Path | str, *, verify: bool = True) -> Bundle:
    """Read `path/manifest.json` and check the graph file it names (hash re-computed when `verify`).

    Raises:
        FileNotFoundError: `path` is not a bundle folder, or the graph file is missing.
        ValueError: unsupported format version, malformed manifest, or a graph whose sha256 differs.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a bundle: no {MANIFEST_FILE}. Build one with `endostream export onnx CHECKPOINT --out "
            f"{path}`, or run `make demo` to build and serve the demo bundle"
        )
    try:
        raw = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err})") from err
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != SUPPORTED_FORMAT:
        raise ValueError(f"{manifest_path}: format_version {version!r} is not supported (expected {SUPPORTED_FORMAT})")
    try:
        manifest = ManifestModel.model_validate(raw)
    except ValidationError as err:  # one line per bad field (pydantic's own text spans several lines per error)
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']} (got {e.get('input')!r:.80})"
            for e in err.errors()
        )
        raise ValueError(f"{manifest_path} is malformed: {problems}; re-export the bundle") from err
    bundle = Bundle(path, manifest, raw)
    if not bundle.model_path.resolve().is_relative_to(path.resolve()):
        # The hash check only proves the manifest and the graph agree; a bundle that may name any file on the box
        # would let whoever writes manifests load (and hash-pin) a graph from anywhere.
        raise ValueError(
            f"{manifest_path}: model_file {manifest.model_file!r} points outside the bundle folder {path}; copy the "
            'graph into the bundle and name it relative to it (e.g. "model.onnx")'
        )
    if not bundle.model_path.is_file():
        raise FileNotFoundError(f"{manifest_path} names {manifest.model_file}, which is missing from {path}")
    if verify and sha256_file(bundle.model_path) != manifest.model_sha256:
        raise ValueError(
            f"{bundle.model_path} does not match the sha256 in {manifest_path}: the bundle was modified; re-export it"
        )
    if manifest.temporal is not None:
        _check_temporal(bundle, manifest_path, verify=verify)
    return bundle


def _check_temporal(bundle: Bundle, manifest_path: Path, *, verify: bool) -> None:
    """The temporal head follows a classification task, reads one of its outputs and ships a hash-pinned graph."""
    temporal = bundle.manifest.temporal
    assert temporal is not None
    where = f"{manifest_path}: temporal"
    task = next((t for t in bundle.manifest.tasks if t.name == temporal.task), None)
    if task is None or task.kind != "classification":
        raise ValueError(
            f"{where}.task {temporal.task!r} is not a classification task of this bundle "
            f"(tasks: {[t.name for t in bundle.manifest.tasks]}); re-export the bundle"
        )
    outputs = {task.output, task.features_output, task.logits_output} - {None}
    if temporal.input_output not in outputs:
        raise ValueError(
            f"{where}.input_output {temporal.input_output!r} is not an output of task {task.name!r} "
            f"(it has {sorted(o for o in outputs if o)}); re-export the bundle"
        )
    graph = bundle.path / temporal.graph
    if not graph.resolve().is_relative_to(bundle.path.resolve()) or not graph.is_file():
        raise FileNotFoundError(f"{where}.graph {temporal.graph!r} is missing from {bundle.path} (or outside it)")
    if temporal.graph_sha256 is None:
        raise ValueError(f"{where}: no sha256 for {temporal.graph} (temporal.graph_sha256); re-export the bundle")
    if verify and sha256_file(graph) != temporal.graph_sha256:
        raise ValueError(f"{graph} does not match its sha256 in {manifest_path}: the bundle was modified; re-export it")

"""`manifest.json`: what a bundle holds and how to feed it, readable without torch or onnx.

A bundle is a folder: `model.onnx` (one graph for all tasks) + `manifest.json`. The manifest names the model, the
tasks with their class names and colours, the graph's input (layout, dtype, size, colour order) and outputs, the
precision and opset, the sha256 of the graph and of the source checkpoint, and the checks the exporter ran.

Optional temporal head (issue 20): a classification task's `features_output` names the graph output with its
pre-logit features, and the top-level `temporal` section describes `temporal_head.onnx` (one time step with explicit
state; see export/temporal.py). Both are left out of bundles without a temporal head, which read as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"


@dataclass
class InputSpec:
    name: str
    layout: str  # "NHWC"
    dtype: str  # "uint8"
    height: int
    width: int
    color_order: str  # "RGB"
    max_batch: int | None = None  # None: any batch size


@dataclass
class TaskEntry:
    name: str
    kind: str  # "classification" | "segmentation"
    classes: list[str]
    output: str  # graph output holding the result (probabilities or class map)
    colors: list[list[int]] | None = None  # RGB per class, segmentation only
    logits_output: str | None = None
    features_output: str | None = None  # graph output with the pre-logit features (classification only)


@dataclass
class Manifest:
    family: str
    name: str
    tasks: list[TaskEntry]
    input: InputSpec
    precision: str  # "fp32" | "int8" | ...
    opset: int
    model_file: str
    model_sha256: str
    checkpoint_sha256: str
    created: str  # ISO 8601, UTC
    exporter_version: str
    format_version: int = FORMAT_VERSION
    checks: dict[str, Any] = field(default_factory=dict)
    engines: list[dict[str, Any]] = field(default_factory=list)  # TensorRT engines built next to the graph
    # The temporal head: task, method, graph, input_output, input_dim, state_shape, frame_interval_s,
    # receptive_field_frames, parity_max_abs_diff, graph_sha256 (export/temporal.py `manifest_section`).
    temporal: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        if body["temporal"] is None:  # absent, not null: no temporal head
            del body["temporal"]
        for task in body["tasks"]:
            if task["features_output"] is None:
                del task["features_output"]
        return body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        body = dict(data)
        body["tasks"] = [TaskEntry(**t) for t in body["tasks"]]
        body["input"] = InputSpec(**body["input"])
        return cls(**body)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: Path, manifest: Manifest) -> Path:
    path = Path(bundle) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read_manifest(bundle: Path, *, verify: bool = True) -> Manifest:
    """Read and check `bundle/manifest.json`; `verify` also re-hashes the graph file.

    Raises:
        FileNotFoundError: no manifest or no graph file in `bundle`.
        ValueError: unsupported format version, unreadable fields, or a graph whose hash differs.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: no {MANIFEST_FILE}; make one with `endostream export onnx`")
    data = json.loads(path.read_text())
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as err:
        raise ValueError(f"{path}: malformed manifest ({err})") from err
    graph = bundle / manifest.model_file
    if not graph.is_file():
        raise FileNotFoundError(f"{path} names {manifest.model_file}, which is missing from {bundle}")
    if verify and sha256_file(graph) != manifest.model_sha256:
        raise ValueError(f"{graph} does not match the sha256 in {path}: the bundle was modified; export it again")
    if manifest.temporal is not None:
        head = bundle / manifest.temporal["graph"]
        if not head.is_file():
            raise FileNotFoundError(f"{path} names the temporal head {head.name}, which is missing from {bundle}")
        if verify and sha256_file(head) != manifest.temporal.get("graph_sha256"):
            raise ValueError(f"{head} does not match the sha256 in {path}: the bundle was modified; export it again")
    return manifest

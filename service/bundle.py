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
    return bundle

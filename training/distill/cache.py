"""Disk cache of frozen teachers' feature maps: each teacher runs once per image; later epochs and runs read the maps.

Teachers are frozen, so their output for an image never changes: SAK (shared/MODEL_NOTES.md §2, "We add") stores it.
A store belongs to one teacher *as configured*: its fingerprint hashes the teacher's weights (whatever checkpoint or
seed produced them) together with its view (input size, resize mode, levels, norm, grid limit), the pixel
normalisation and the storage dtype; any change gives a new store. Inside a store an image is keyed by the SHA-1 of its
exact uint8 pixels and size as the model receives them, so the same frame is found from any dataset or run, and a frame
that differs (another resolution, an augmentation) is never served another frame's features.

Layout of `<root>/<teacher key>-<fingerprint[:16]>/<H>x<W>/` (one folder per image size, whose maps share shapes):

    meta.json      fingerprint, description, per-level map shapes (C h w) and dtype
    level<i>.bin   one row per image (C*h*w values, row-major), memory-mapped for reading
    index.txt      append-only "<image key> <row>" lines; row i is the i-th line
    lock           `flock` target: writers (other ranks, other runs) append one at a time

Rows are written before their index line, so a crash leaves at most unindexed bytes that the next writer overwrites.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32}
Compute = Callable[[Tensor, Sequence[str]], dict[str, list[Tensor]]]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/endostream/teacher_features` (`~/.cache/...` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "endostream" / "teacher_features"


def image_key(image: Tensor) -> str:
    """SHA-1 of one image's size and exact pixels (3 H W; uint8, or 0-255 floats that are rounded to uint8)."""
    if image.dtype != torch.uint8:
        image = image.round().clamp(0, 255).to(torch.uint8)
    data = image.detach().cpu().contiguous().numpy()
    digest = hashlib.sha1(f"{tuple(data.shape)}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def teacher_fingerprint(teacher: nn.Module, description: Mapping[str, Any]) -> str:
    """SHA-256 of `description` (JSON, sorted keys) and every tensor of `teacher.state_dict()` (name, shape, data)."""
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **description}, sort_keys=True).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureStore:
    """One teacher's maps on disk: rows of every level, looked up by image key (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: str, description: Mapping[str, Any], dtype: str = "float16") -> None:
        """
        Args:
            folder: the store's folder (created when missing).
            fingerprint: full teacher fingerprint; an existing folder with another one is refused.
            description: recorded in meta.json (teacher name, checkpoint, view) for people reading the cache.
            dtype: "float16" (half the disk, ~1e-3 relative rounding) or "float32".
        """
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.description = dict(description)
        self.dtype = np.dtype(DTYPES[dtype])
        self.shapes: list[tuple[int, ...]] | None = None
        self._index: dict[str, int] = {}
        self._index_bytes = 0
        self._maps: list[np.memmap | None] = []
        self._read_meta()
        self._refresh()

    # ---------------------------------------------------------------------------------------------- bookkeeping
    @property
    def _meta_path(self) -> Path:
        return self.folder / "meta.json"

    def _read_meta(self) -> None:
        if not self._meta_path.is_file():
            return
        meta = json.loads(self._meta_path.read_text())
        if meta.get("fingerprint") != self.fingerprint or meta.get("dtype") != self.dtype.name:
            raise RuntimeError(
                f"teacher cache {self.folder} belongs to fingerprint {meta.get('fingerprint')} ({meta.get('dtype')}), "
                f"not {self.fingerprint} ({self.dtype.name}); delete the folder or point model.sak.cache_dir elsewhere"
            )
        self._set_shapes([tuple(shape) for shape in meta["shapes"]])

    def _set_shapes(self, shapes: list[tuple[int, ...]]) -> None:
        self.shapes = shapes
        self._row_bytes = [int(np.prod(shape)) * self.dtype.itemsize for shape in shapes]
        self._maps = [None] * len(shapes)

    def _refresh(self) -> None:
        """Read index lines appended since the last call (by this or another process); partial lines wait."""
        path = self.folder / "index.txt"
        if not path.is_file():
            return
        with path.open("rb") as fh:
            fh.seek(self._index_bytes)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.decode().splitlines():
            key, row = line.split()
            self._index[key] = int(row)
        self._index_bytes += len(complete)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.folder / "lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def __len__(self) -> int:
        return len(self._index)

    # --------------------------------------------------------------------------------------------------- access
    def rows(self, keys: Sequence[str]) -> list[int | None]:
        """Row of each key (None = not stored); keys written by other processes are seen after a refresh."""
        if any(key not in self._index for key in keys):
            self._refresh()
        return [self._index.get(key) for key in keys]

    def read(self, rows: Sequence[int]) -> list[np.ndarray]:
        """Per level, the maps of `rows` stacked: n C h w in the store's dtype."""
        assert self.shapes is not None, "read from an empty store"
        out = []
        for level, shape in enumerate(self.shapes):
            table = self._maps[level]
            if table is None or max(rows) >= table.shape[0]:
                path = self.folder / f"level{level}.bin"
                count = path.stat().st_size // self._row_bytes[level]
                table = np.memmap(path, dtype=self.dtype, mode="r", shape=(count, *shape))
                self._maps[level] = table
            out.append(np.stack([table[row] for row in rows]))
        return out

    def append(self, keys: Sequence[str], levels: Sequence[np.ndarray]) -> int:
        """Store maps (per level, n C h w) under `keys`; keys already present are skipped. Returns rows written."""
        shapes = [tuple(level.shape[1:]) for level in levels]
        with self._locked():
            self._refresh()
            if self.shapes is None and self._meta_path.is_file():
                self._read_meta()
            if self.shapes is None:
                meta = {
                    "fingerprint": self.fingerprint,
                    "dtype": self.dtype.name,
                    "shapes": [list(shape) for shape in shapes],
                    "description": self.description,
                    "version": CACHE_VERSION,
                }
                tmp = self._meta_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(meta, indent=1))
                tmp.replace(self._meta_path)
                self._set_shapes(shapes)
            if shapes != self.shapes:
                raise RuntimeError(
                    f"teacher maps of shapes {shapes} do not fit the cache {self.folder} ({self.shapes})"
                )
            fresh: dict[str, int] = {}
            for position, key in enumerate(keys):
                if key not in self._index and key not in fresh:
                    fresh[key] = position
            if not fresh:
                return 0
            start = len(self._index)
            picks = list(fresh.values())
            for level, array in enumerate(levels):
                path = self.folder / f"level{level}.bin"
                with path.open("r+b" if path.exists() else "wb") as fh:
                    fh.seek(start * self._row_bytes[level])
                    fh.write(np.ascontiguousarray(array[picks], dtype=self.dtype).tobytes())
            lines = "".join(f"{key} {start + i}\n" for i, key in enumerate(fresh))
            with (self.folder / "index.txt").open("a") as fh:
                fh.write(lines)
            self._refresh()
        return len(fresh)


class TeacherFeatureCache:
    """SAK's feature source with a disk cache: teacher maps for a batch, computing only images not stored yet.

    Freshly computed maps are returned as read back from disk, so every epoch sees bit-identical targets.
    """

    def __init__(
        self,
        root: Path | str,
        fingerprints: Mapping[str, str],
        compute: Compute,
        *,
        dtype: Literal["float16", "float32"] = "float16",
        descriptions: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """
        Args:
            root: cache folder holding one store per teacher fingerprint.
            fingerprints: teacher key -> `teacher_fingerprint(...)`.
            compute: (uint8-range images B 3 H W, teacher keys) -> teacher key -> maps per level (B C h w).
            dtype: storage dtype.
            descriptions: teacher key -> what meta.json records about it.
        """
        self.root = Path(root)
        self.compute = compute
        self.fingerprints = dict(fingerprints)
        self.descriptions = {key: dict((descriptions or {}).get(key, {})) for key in fingerprints}
        self.dtype = dtype
        self.folders = {key: self.root / f"{key}-{fingerprint[:16]}" for key, fingerprint in fingerprints.items()}
        self._stores: dict[tuple[str, int, int], FeatureStore] = {}
        self.computed = 0  # images the teachers ran on
        self.read_back = 0  # images served from disk without running the teachers

    def __deepcopy__(self, memo: dict[int, Any]) -> TeacherFeatureCache:
        return self  # a handle on files: model copies share it

    def store(self, teacher: str, size: tuple[int, int]) -> FeatureStore:
        """The store of `teacher` for images of `size` (H, W): `<teacher folder>/<H>x<W>/` (map shapes follow size)."""
        index = (teacher, int(size[0]), int(size[1]))
        if index not in self._stores:
            folder = self.folders[teacher] / f"{index[1]}x{index[2]}"
            self._stores[index] = FeatureStore(
                folder, self.fingerprints[teacher], self.descriptions[teacher], self.dtype
            )
        return self._stores[index]

    def _batch_stores(self, images: Tensor) -> dict[str, FeatureStore]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return {teacher: self.store(teacher, size) for teacher in self.folders}

    def ensure(self, images: Tensor) -> list[str]:
        """Run the teachers on the images of the batch that some store lacks and store the maps; returns the keys."""
        keys = [image_key(image) for image in images.detach().cpu()]  # one device -> host copy per batch
        stores = self._batch_stores(images)
        missing = {
            teacher: [i for i, row in enumerate(store.rows(keys)) if row is None] for teacher, store in stores.items()
        }
        needed = sorted({i for positions in missing.values() for i in positions})
        if needed:
            teachers = [teacher for teacher, positions in missing.items() if positions]
            maps = self.compute(images[needed], teachers)
            for teacher in teachers:
                where = [needed.index(i) for i in missing[teacher]]
                levels = [level[where].detach().float().cpu().numpy() for level in maps[teacher]]
                stores[teacher].append([keys[i] for i in missing[teacher]], levels)
            self.computed += len(needed)
        self.read_back += len(keys) - len(needed)
        return keys

    def __call__(self, images: Tensor) -> dict[str, list[Tensor]]:
        """Teacher key -> float32 maps per level (B C h w) on the images' device."""
        keys = self.ensure(images)
        out = {}
        for teacher, store in self._batch_stores(images).items():
            rows = store.rows(keys)
            levels = store.read([row for row in rows if row is not None])
            out[teacher] = [torch.from_numpy(level).to(images.device, torch.float32) for level in levels]
        return out

    def fill(self, dataset: Any, *, batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> None:
        """Compute and store the maps of every image of `dataset` (samples with an H W 3 uint8 `image`) not stored yet.

        This is the teachers' one pass over a dataset; training then only reads. In a data-parallel run each rank fills
        its share, then waits for the others.
        """
        shared = dist.is_available() and dist.is_initialized()
        part = Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size())) if shared else dataset
        loader = DataLoader(
            part, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_images
        )
        before, started = self.computed, time.perf_counter()
        for images in tqdm(loader, desc="teacher features", disable=not progress, leave=False, dynamic_ncols=True):
            self.ensure(images)
        if shared:
            dist.barrier()
        logger.info(
            "teacher cache %s: %d of %d images computed in %.1f s, the rest were stored already (%s)",
            self.root,
            self.computed - before,
            len(dataset),
            time.perf_counter() - started,
            ", ".join(f"{key[0]} at {key[1]}x{key[2]}: {len(store)} images" for key, store in self._stores.items()),
        )


def collate_images(batch: Sequence[Mapping[str, Any]]) -> Tensor:
    """Collate only the images: B 3 H W uint8, laid out exactly as `training.data.transforms.collate` does."""
    return torch.from_numpy(np.stack([sample["image"] for sample in batch])).permute(0, 3, 1, 2).contiguous()

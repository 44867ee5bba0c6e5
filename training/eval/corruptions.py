"""Image corruptions for the robustness evaluation (`robustness.py`, `endostream eval --corruptions`): the tables,
the parsing of the CLI lists, and a seeded corrupted view of a dataset.

EndoARSS (shared/papers/endoarss.md, IV-C 5, Table VII and Fig. 6) scores 19 corruptions at 5 severities, following
Surgical-VQLA++ (Bai et al. 2025). The corruptions are the ImageNet-C ones of Hendrycks & Dietterich 2019 ("Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations") from the `imagecorruptions` package (Michaelis et
al. 2019), not written again here: its 15 benchmark corruptions plus the 4 held-out ones (speckle noise, Gaussian blur,
spatter, saturate) make 19. Sixteen of them are in the paper's list; the paper's bleeding, smoke and gamma come from
Surgical-VQLA++'s own code, which is not in the package, and the package's snow, frost and fog take their places.
Families follow the package (noise, blur, weather, digital; the paper calls weather "occlusion"), with the held-out four
put where the paper puts them.

Only the image is corrupted, at its stored resolution and before the eval transform; masks and activity labels stay as
they are. Every corruption call is seeded from (seed, corruption, severity, frame index): reruns give the same images.

Package note: the PyPI `imagecorruptions` 1.1.2 (2020) imports `pkg_resources` (gone from setuptools >= 81) and uses
`np.float_` (gone from NumPy 2), so it cannot run here. `imagecorruptions-imaug` is the same code, maintained for
NumPy 2 / current scikit-image, under the same module name and API; it is what pyproject's `train` extra names.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Family -> corruptions, in the package's order; the held-out four placed as in the paper's Table VII.
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "brightness", "spatter"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for names in FAMILIES.values() for name in names)
FAMILY_OF: dict[str, str] = {name: family for family, names in FAMILIES.items() for name in names}
SEVERITIES = (1, 2, 3, 4, 5)
# Corruptions that draw from their own generator and take a `seed` argument instead of NumPy's global state.
_SEED_ARGUMENT = ("impulse_noise", "glass_blur")


def corrupt_function():
    try:
        from imagecorruptions import corrupt, get_corruption_names
    except ImportError as err:  # the package or one of its own imports (scikit-image, numba) is missing
        raise RuntimeError(
            f"robustness needs the imagecorruptions package ({err}); install it with "
            "`pip install imagecorruptions-imaug scikit-image` (or `pip install -e .[train]`)"
        ) from err
    missing = sorted(set(CORRUPTIONS) - set(get_corruption_names("all")))
    if missing:
        raise RuntimeError(f"the installed imagecorruptions lacks {missing}; install imagecorruptions-imaug>=1.1.5")
    return corrupt


def parse_corruptions(spec: str) -> list[str]:
    """`all`, a family name (`noise`, `blur`, `weather`, `digital`) or comma-separated names -> corruption names."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if item == "all":
            names += CORRUPTIONS
        elif item in FAMILIES:
            names += FAMILIES[item]
        elif item in FAMILY_OF:
            names.append(item)
        else:
            raise ValueError(
                f"--corruptions: unknown corruption {item!r}; use all, a family {sorted(FAMILIES)} or names from "
                f"{list(CORRUPTIONS)}"
            )
    return list(dict.fromkeys(names))


def parse_severities(spec: str) -> list[int]:
    """`1-5`, `3` or `1,3,5` -> sorted severities in 1..5."""
    values: set[int] = set()
    try:
        for item in (part.strip() for part in spec.split(",")):
            low, _, high = item.partition("-")
            values.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--severities {spec!r} must look like 1-5, 3 or 1,3,5") from None
    if not values or min(values) < 1 or max(values) > 5:
        raise ValueError(f"--severities {spec!r} must lie in 1..5 (the ImageNet-C levels)")
    return sorted(values)


def corruption_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The seed of one corruption call: stable across runs and processes (crc32, not Python's salted hash)."""
    return zlib.crc32(f"{seed}/{name}/{severity}/{index}".encode()) & 0x7FFFFFFF


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (H W 3 uint8) with corruption `name` at `severity`, deterministic for a given `seed`.

    NumPy's global random state is restored afterwards, so the caller's random stream is not disturbed.
    """
    if name not in FAMILY_OF:
        raise ValueError(f"unknown corruption {name!r}; choose from {list(CORRUPTIONS)}")
    if min(image.shape[:2]) < 32:
        raise ValueError(f"image of {image.shape[:2]} px is below the 32 px the corruptions need; use larger frames")
    corrupt = corrupt_function()
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        kwargs = {"seed": seed} if name in _SEED_ARGUMENT else {}
        out = corrupt(np.ascontiguousarray(image), corruption_name=name, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)  # some corruptions return floats in [0, 255]


@dataclass
class CorruptedDataset:
    """A dataset whose images are corrupted on read (labels untouched); wrap it in `TaskDataset` as usual.

    Args:
        dataset: indexable of sample dicts with an `image` (H W 3 uint8).
        name: corruption name.
        severity: 1..5.
        seed: base seed; each frame gets `corruption_seed(seed, name, severity, index)`.
    """

    dataset: Any
    name: str
    severity: int
    seed: int = 0

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> Any:
        return getattr(self.dataset, "labels", None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        seed = corruption_seed(self.seed, self.name, self.severity, index)
        sample["image"] = corrupt_image(sample["image"], self.name, self.severity, seed)
        return sample

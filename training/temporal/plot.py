"""A timeline plot of one clip: ground truth, the per-frame labels and each temporal head's labels over time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from training.temporal.metrics import segments


def plot_timeline(
    path: Path,
    rows: Mapping[str, np.ndarray],
    classes: Sequence[str],
    frame_interval_s: float,
    title: str = "",
) -> Path:
    """Save a PNG with one horizontal band per row (name -> T label indices), coloured by class, time in seconds."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.2))
    for r, labels in enumerate(rows.values()):
        for label, s, e in segments(labels):
            ax.barh(r, (e - s) * frame_interval_s, left=s * frame_interval_s, color=colours[label % 10], height=0.8)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title)
    handles = [Patch(color=colours[i % 10], label=c) for i, c in enumerate(classes)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(classes), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

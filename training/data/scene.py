"""Synthetic endoscopy scenes: class tables, scene sampling, and the rule that derives the activity label.

Geometry is in pixels of the frame (x right, y down). Sizes scale with S = min(height, width), so one scene
description renders at any resolution. A scene is a circular field of view (FoV), a tissue layout (at most one
lesion, 0-2 blood pools, fat patches) and 1-3 instruments, each a shaft entering from the FoV border with its tip
(the business end: jaw tips, blade tips, hook elbow, tube mouth) inside the FoV.

Activity rule
-------------
The label is computed from the rendered geometry, never copied from what the sampler aimed for. Inputs: the tissue
label map under the instruments (lesion, blood; background outside the FoV) and every instrument's tip point.
Let sd(p) be the exact Euclidean distance from p to the lesion boundary in pixels (positive inside, +-0.5 for the
pixels next to the boundary, -inf without a lesion); tips are looked up at their nearest pixel.
An instrument whose tip lies inside the FoV *engages* when

- grasper:      sd(tip) >= 0.02 S      (jaws on the lesion, clearly inside its border)  -> grasping
- scissors:     |sd(tip)| <= 0.03 S    (blades at the lesion edge)                      -> cutting
- hook:         sd(tip) >= -0.03 S     (electrode on the lesion or its margin)          -> cauterization
- suction tube: the tip pixel is blood                                                  -> suction
- clip applier: never (it is always a distractor)

The frame's activity is that of the engaged instrument; if several engage, the first in the order cauterization >
cutting > grasping > suction wins (the sampler avoids such frames); with none engaged the frame is idle. Instruments
are present in every frame, and about half the frames hold a second, non-engaged instrument (a distractor), so the
activity depends on which instrument is where, not on which instruments are visible. The renderer then shows the
consequences of the derived activity (closed jaws and tented tissue, open blades and an incision, smoke and char,
froth and ripples; see synth.py).

Still frames aim each activity with probability 1/5. Targets lie MARGIN (0.02 S) inside their threshold and resting
tips IDLE_GAP (0.10 S) outside it (resting scissors outside the lesion), so no frame sits on a knife edge and an idle
instrument visibly does not touch its target. Clips (`plan_clip`) move the instruments smoothly between
rest and target positions while the camera drifts; the rule is applied per frame, so labels change exactly when a
tip crosses a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

ACTIVITIES: tuple[str, ...] = ("grasping", "cutting", "cauterization", "suction", "idle")
INSTRUMENTS: tuple[str, ...] = ("grasper", "scissors", "hook", "suction_tube", "clip_applier")
SEGMENTATION_CLASSES: tuple[str, ...] = ("background", "lesion", "blood", *INSTRUMENTS)
SEGMENTATION_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 214, 102),
    (170, 0, 0),
    (0, 200, 255),
    (255, 64, 255),
    (64, 255, 64),
    (64, 96, 255),
    (255, 140, 0),
)
LESION, BLOOD = 1, 2
INSTRUMENT_CLASS: dict[str, int] = {kind: 3 + i for i, kind in enumerate(INSTRUMENTS)}
ACTOR: dict[str, str] = {
    "grasping": "grasper",
    "cutting": "scissors",
    "cauterization": "hook",
    "suction": "suction_tube",
}
ENGAGED_ACTIVITY: dict[str, str] = {kind: act for act, kind in ACTOR.items()}
PRIORITY: tuple[str, ...] = ("cauterization", "cutting", "grasping", "suction")

# Rule thresholds, as fractions of S (see the module docstring).
GRASP_DEPTH = 0.02
CUT_BAND = 0.03
CAUTERY_REACH = 0.03
# Margins (times `slack`) that sampled targets keep inside, and resting tips keep outside, the thresholds: resting
# tips stay clearly away from their targets so that "idle" is a visible state, not a one-pixel difference.
MARGIN = 0.02
IDLE_GAP = 0.10
TIP_FOV_FRACTION = 0.8  # tips lie within this fraction of the FoV radius

# Instrument proportions: shaft half-width (fraction of S) and tip length (in half-widths).
HALF_WIDTH = (0.04, 0.058)
HALF_WIDTH_SCALE = {"grasper": 1.0, "scissors": 1.0, "hook": 0.95, "suction_tube": 0.85, "clip_applier": 1.1}
TIP_LENGTH = {"grasper": 3.2, "scissors": 3.4, "hook": 3.6, "suction_tube": 0.0, "clip_applier": 3.0}


@dataclass(frozen=True)
class FieldOfView:
    """Circular endoscope field of view; everything outside is black and labelled background."""

    cx: float
    cy: float
    radius: float
    vignette: float = 0.45

    def radius_map(self, height: int, width: int) -> np.ndarray:
        ys, xs = np.ogrid[:height, :width]
        return np.sqrt((xs - self.cx) ** 2 + (ys - self.cy) ** 2).astype(np.float32)

    def contains(self, point: tuple[float, float], fraction: float = 1.0) -> bool:
        return math.hypot(point[0] - self.cx, point[1] - self.cy) <= self.radius * fraction


@dataclass(frozen=True)
class TissueLayout:
    """Tissue regions as polygons (N x 2 float arrays, x y); `palette` picks the lesion's colour family."""

    lesion: np.ndarray | None
    pools: tuple[np.ndarray, ...] = ()
    fat: tuple[np.ndarray, ...] = ()
    palette: int = 0


@dataclass
class InstrumentPose:
    """One instrument in frame coordinates; `tip` is the business end, the shaft runs from `entry` through it."""

    kind: str
    entry: tuple[float, float]
    tip: tuple[float, float]
    half_width: float
    opening: float = 0.5  # 0 closed .. 1 fully open (grasper, scissors, clip applier)
    side: int = 1  # hook direction / blade curvature
    shade: float = 1.0  # brightness jitter of the materials
    highlight: float = 0.0  # lateral offset of the specular stripe (-1..1 of the half-width)

    @property
    def tip_length(self) -> float:
        return TIP_LENGTH[self.kind] * self.half_width


@dataclass
class Scene:
    """A still frame's scene before rendering: geometry, derived activity and the engaged instrument (or None)."""

    height: int
    width: int
    fov: FieldOfView
    layout: TissueLayout
    tissue: np.ndarray  # H W uint8: 0 / LESION / BLOOD, zero outside the FoV
    instruments: list[InstrumentPose]
    activity: str
    actor: int | None
    intent: str
    extras: dict[str, float] = field(default_factory=dict)


def blob(
    rng: np.random.Generator, center: tuple[float, float], radius: float, irregularity: float = 0.18
) -> np.ndarray:
    """Closed irregular polygon: an ellipse whose radius is perturbed by a few random harmonics."""
    n = 64
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += irregularity / k**0.8 * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.7, 1.0)
    angle = rng.uniform(0, np.pi)
    x, y = radius * r * np.cos(theta), radius * aspect * r * np.sin(theta)
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([center[0] + ca * x - sa * y, center[1] + sa * x + ca * y], axis=1).astype(np.float32)


def fill_polygon(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    """Boolean raster of a polygon (sub-pixel vertices; the same raster for labels and colour)."""
    out = np.zeros(shape, np.uint8)
    cv2.fillPoly(out, [np.round(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return out.astype(bool)


def rasterize(layout: TissueLayout, height: int, width: int, fov: FieldOfView | None) -> np.ndarray:
    """Tissue label map (0 / LESION / BLOOD; blood lies on top of the lesion), cut to the FoV when given."""
    labels = np.zeros((height, width), np.uint8)
    if layout.lesion is not None:
        labels[fill_polygon(labels.shape, layout.lesion)] = LESION
    for pool in layout.pools:
        labels[fill_polygon(labels.shape, pool)] = BLOOD
    if fov is not None:
        labels[fov.radius_map(height, width) > fov.radius] = 0
    return labels


def signed_distance(region: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance to the region's boundary in pixels, positive inside, measured to the pixel edge
    (a pixel on either side of the boundary is +-0.5); -1e6 everywhere for an empty region."""
    if not region.any():
        return np.full(region.shape, -1e6, np.float32)
    inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(region, inside - 0.5, 0.5 - outside).astype(np.float32)


class TissueGeometry:
    """Per-pixel quantities the rule needs, computed once per frame from the tissue label map."""

    def __init__(self, tissue: np.ndarray, fov: FieldOfView) -> None:
        self.tissue, self.fov = tissue, fov
        self.height, self.width = tissue.shape
        self.size = float(min(self.height, self.width))
        self.lesion_sd = signed_distance(tissue == LESION)
        self._blood_sd: np.ndarray | None = None
        self._tip_area: np.ndarray | None = None

    @property
    def blood_sd(self) -> np.ndarray:
        """Signed distance to the blood boundary (computed on first use: only suction placement needs it)."""
        if self._blood_sd is None:
            self._blood_sd = signed_distance(self.tissue == BLOOD)
        return self._blood_sd

    @property
    def tip_area(self) -> np.ndarray:
        """Where tips may be placed: inside TIP_FOV_FRACTION of the FoV and 5% of S away from the image border."""
        if self._tip_area is None:
            inner = self.fov.radius_map(self.height, self.width) <= TIP_FOV_FRACTION * self.fov.radius
            border = max(1, int(0.05 * self.size))
            inner[:border], inner[-border:], inner[:, :border], inner[:, -border:] = False, False, False, False
            self._tip_area = inner
        return self._tip_area

    def _at(self, array: np.ndarray, point: tuple[float, float]) -> float:
        x = min(max(int(round(point[0])), 0), self.width - 1)
        y = min(max(int(round(point[1])), 0), self.height - 1)
        return float(array[y, x])

    def engaged(self, pose: InstrumentPose) -> bool:
        """The rule of the module docstring for one instrument."""
        if not self.fov.contains(pose.tip) or pose.kind not in ENGAGED_ACTIVITY:
            return False
        if not (0 <= pose.tip[0] < self.width and 0 <= pose.tip[1] < self.height):
            return False
        sd, s = self._at(self.lesion_sd, pose.tip), self.size
        if pose.kind == "grasper":
            return sd >= GRASP_DEPTH * s
        if pose.kind == "scissors":
            return abs(sd) <= CUT_BAND * s
        if pose.kind == "hook":
            return sd >= -CAUTERY_REACH * s
        x, y = int(round(pose.tip[0])), int(round(pose.tip[1]))
        return bool(self.tissue[y, x] == BLOOD)

    def tip_candidates(self, kind: str, engaged: bool, slack: float = 1.0) -> np.ndarray:
        """Pixels where a `kind` tip is engaged (`slack` * MARGIN * S inside the threshold) or rests (`slack` *
        IDLE_GAP * S outside it; resting scissors stay outside the lesion)."""
        s, m, gap = self.size, slack * MARGIN * self.size, slack * IDLE_GAP * self.size
        sd = self.lesion_sd
        if kind == "grasper":
            ok = sd >= GRASP_DEPTH * s + m if engaged else sd <= GRASP_DEPTH * s - gap
        elif kind == "scissors":
            # At tiny sizes the band may hold no pixel centre with the margin; keep at least the edge pixels.
            ok = np.abs(sd) <= max(CUT_BAND * s - 0.9 * m, 0.5) if engaged else sd <= -CUT_BAND * s - gap
        elif kind == "hook":
            ok = (sd >= -CAUTERY_REACH * s + m) & (sd <= 0.06 * s) if engaged else sd <= -CAUTERY_REACH * s - gap
        elif kind == "suction_tube":
            ok = self.blood_sd >= m if engaged else self.blood_sd <= -gap
        elif kind == "clip_applier":
            if engaged:
                raise ValueError("the clip applier never engages; it is only drawn as a distractor")
            ok = np.ones_like(sd, dtype=bool)
        else:
            raise ValueError(f"unknown instrument kind {kind!r}; known: {INSTRUMENTS}")
        return ok & self.tip_area


def derive_activity(instruments: list[InstrumentPose], geometry: TissueGeometry) -> tuple[str, int | None]:
    """(activity, index of the engaged instrument or None) by the rule of the module docstring."""
    engaged = {ENGAGED_ACTIVITY[p.kind]: i for i, p in enumerate(instruments) if geometry.engaged(p)}
    for activity in PRIORITY:
        if activity in engaged:
            return activity, engaged[activity]
    return "idle", None


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> tuple[float, float] | None:
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        return None
    i = int(flat[rng.integers(flat.size)])
    y, x = divmod(i, candidates.shape[1])
    return float(x) + rng.uniform(-0.3, 0.3), float(y) + rng.uniform(-0.3, 0.3)


def _angle_gap(a: float, b: float) -> float:
    d = abs(a - b) % (2 * np.pi)
    return min(d, 2 * np.pi - d)


def choose_entry(
    rng: np.random.Generator, tip: tuple[float, float], fov: FieldOfView, taken: list[float]
) -> tuple[float, tuple[float, float]]:
    """Entry angle and point on the FoV border: far enough from the tip, away from other instruments' entries."""
    best: tuple[float, float] | None = None
    for attempt in range(40):
        angle = rng.uniform(0, 2 * np.pi)
        if attempt < 30 and any(_angle_gap(angle, t) < 1.1 for t in taken):
            continue
        entry = (fov.cx + fov.radius * math.cos(angle), fov.cy + fov.radius * math.sin(angle))
        length = math.hypot(entry[0] - tip[0], entry[1] - tip[1])
        if length >= 0.55 * fov.radius:
            return angle, entry
        if best is None or length > best[1]:
            best = (angle, length)
    assert best is not None
    angle = best[0]
    return angle, (fov.cx + fov.radius * math.cos(angle), fov.cy + fov.radius * math.sin(angle))


def sample_pose_style(rng: np.random.Generator, kind: str, size: float) -> dict[str, float | int]:
    return {
        "half_width": size * rng.uniform(*HALF_WIDTH) * HALF_WIDTH_SCALE[kind],
        "side": int(rng.choice((-1, 1))),
        "shade": rng.uniform(0.8, 1.15),
        "highlight": rng.uniform(-0.5, 0.5),
    }


def sample_fov(rng: np.random.Generator, height: int, width: int, jitter: float = 0.02) -> FieldOfView:
    s = min(height, width)
    return FieldOfView(
        cx=width / 2 + rng.normal(0, jitter * s),
        cy=height / 2 + rng.normal(0, jitter * s),
        radius=0.5 * s * rng.uniform(0.96, 1.12),
        vignette=rng.uniform(0.3, 0.6),
    )


def sample_layout(
    rng: np.random.Generator, fov: FieldOfView, size: float, lesion: bool, pools: int, spread: float = 0.5
) -> TissueLayout:
    """A lesion (if asked) near the FoV centre, `pools` blood pools and 0-2 fat patches."""

    def around(max_fraction: float) -> tuple[float, float]:
        r, a = fov.radius * max_fraction * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        return fov.cx + r * math.cos(a), fov.cy + r * math.sin(a)

    lesion_poly = blob(rng, around(spread), size * rng.uniform(0.13, 0.21), 0.22) if lesion else None
    pool_polys = tuple(blob(rng, around(0.6), size * rng.uniform(0.09, 0.15), 0.3) for _ in range(pools))
    fat = tuple(blob(rng, around(0.8), size * rng.uniform(0.08, 0.16), 0.35) for _ in range(rng.integers(0, 3)))
    return TissueLayout(lesion_poly, pool_polys, fat, int(rng.integers(3)))


def _place(
    rng: np.random.Generator,
    geometry: TissueGeometry,
    kinds: list[str],
    actor: str | None,
    slack: float = 1.0,
) -> list[InstrumentPose] | None:
    poses, taken = [], []
    for kind in kinds:
        tip = _pick(rng, geometry.tip_candidates(kind, engaged=kind == actor, slack=slack))
        if tip is None:
            return None
        angle, entry = choose_entry(rng, tip, geometry.fov, taken)
        taken.append(angle)
        poses.append(InstrumentPose(kind, entry, tip, **sample_pose_style(rng, kind, geometry.size)))
    return poses


def _kinds_for(rng: np.random.Generator, intent: str, distractor_p: float = 0.5) -> tuple[list[str], str | None]:
    """Instrument kinds of a frame, the actor last (it is drawn on top)."""
    if intent == "idle":
        count = 1 + int(rng.random() < distractor_p)
        return [str(k) for k in rng.choice(INSTRUMENTS, size=count, replace=False)], None
    actor = ACTOR[intent]
    kinds = [actor]
    if rng.random() < distractor_p:
        kinds.insert(0, str(rng.choice([k for k in INSTRUMENTS if k != actor])))
    return kinds, actor


def sample_scene(rng: np.random.Generator, height: int, width: int, intent: str | None = None) -> Scene:
    """Sample a still frame: FoV, tissue, instruments placed for `intent` (random if None), derived activity."""
    size = float(min(height, width))
    fov = sample_fov(rng, height, width)
    intent = intent or ACTIVITIES[int(rng.integers(len(ACTIVITIES)))]
    if intent not in ACTIVITIES:
        raise ValueError(f"unknown activity {intent!r}; known: {ACTIVITIES}")
    for _ in range(20):
        needs_lesion = intent in ("grasping", "cutting", "cauterization") or rng.random() < 0.75
        pools = (1 + int(rng.random() < 0.3)) if intent == "suction" else int(rng.random() < 0.35)
        layout = sample_layout(rng, fov, size, needs_lesion, pools)
        tissue = rasterize(layout, height, width, fov)
        geometry = TissueGeometry(tissue, fov)
        kinds, actor = _kinds_for(rng, intent)
        poses = _place(rng, geometry, kinds, actor)
        if poses is None:
            continue
        activity, actor_index = derive_activity(poses, geometry)
        return Scene(height, width, fov, layout, tissue, poses, activity, actor_index, intent)
    raise RuntimeError(f"could not place instruments for {intent!r} in 20 layouts at {height}x{width}")


# ---------------------------------------------------------------------------------------------------- clips
@dataclass
class Track:
    """One instrument across a clip: fixed trocar entry (screen), style, and its tip path in world coordinates."""

    kind: str
    entry: tuple[float, float]
    style: dict[str, float | int]
    tips: np.ndarray  # F 2 (world x y)


@dataclass
class ClipPlan:
    """Everything needed to render a clip frame by frame (see synth.render_clip)."""

    height: int
    width: int
    fps: int
    frames: int
    fov: FieldOfView
    world_size: tuple[int, int]
    layout: TissueLayout  # world coordinates
    cameras: np.ndarray  # F 2 3 world -> screen affine maps
    tracks: list[Track]
    segments: list[tuple[int, int, str]]  # planned (start, end, intent); labels come from the rule per frame


def _camera_path(rng: np.random.Generator, frames: int, fps: int, world: tuple[int, int], screen: tuple[int, int]):
    """Slow drift: translation, rotation and zoom as sums of slow sinusoids (periods of several seconds)."""
    t = np.arange(frames) / fps
    s = min(screen)

    def slow(amplitude: float) -> np.ndarray:
        period, phase = rng.uniform(6.0, 16.0), rng.uniform(0, 2 * np.pi)
        return amplitude * (np.sin(2 * np.pi * t / period + phase) - np.sin(phase))

    dx, dy = slow(0.05 * s), slow(0.05 * s)
    theta, zoom = slow(math.radians(2.0)), 1.0 + slow(0.03)
    wc = np.array([world[1] / 2, world[0] / 2])
    sc = np.array([screen[1] / 2, screen[0] / 2])
    cams = np.zeros((frames, 2, 3), np.float64)
    for f in range(frames):
        c, si = zoom[f] * math.cos(theta[f]), zoom[f] * math.sin(theta[f])
        rot = np.array([[c, -si], [si, c]])
        cams[f, :, :2] = rot
        cams[f, :, 2] = sc + np.array([dx[f], dy[f]]) - rot @ wc
    return cams


def _segments(rng: np.random.Generator, frames: int, fps: int, activities: list[str]) -> list[tuple[int, int, str]]:
    count = max(1, min(int(rng.integers(3, 5)), frames // max(1, fps)))
    weights = rng.uniform(0.7, 1.3, count)
    bounds = np.round(np.cumsum(weights) / weights.sum() * frames).astype(int)
    starts = [0, *bounds[:-1].tolist()]
    sequence: list[str] = []
    for _ in range(count):
        choices = [a for a in activities if not sequence or a != sequence[-1]]
        sequence.append(str(rng.choice(choices)))
    if all(a == "idle" for a in sequence) and count > 1:
        sequence[1] = activities[0]
    return [(int(s), int(e), a) for s, e, a in zip(starts, bounds.tolist(), sequence, strict=True)]


def plan_clip(rng: np.random.Generator, height: int, width: int, frames: int, fps: int) -> ClipPlan:
    """Plan a clip: two acting instruments (+ an optional distractor) and 3-4 activity segments with idle pauses.

    Each instrument rests at a non-engaged position and moves smoothly (smoothstep over ~0.6 s) to its target when
    its segment starts and back afterwards, with a small tremor; the camera drifts slowly over a tissue canvas 30%
    larger than the frame. Margins are 1.6x those of still frames so drift and tremor do not flip labels mid-hold.
    """
    size = float(min(height, width))
    world = (int(round(height * 1.3)), int(round(width * 1.3)))
    fov = FieldOfView(width / 2, height / 2, 0.5 * size * rng.uniform(1.0, 1.1), rng.uniform(0.3, 0.55))
    world_fov = FieldOfView(world[1] / 2, world[0] / 2, fov.radius * 0.85, fov.vignette)
    for _ in range(30):
        acts = [str(a) for a in rng.choice(list(ACTOR), size=2, replace=False)]
        layout = sample_layout(rng, world_fov, size, True, (1 + int(rng.random() < 0.4)) if "suction" in acts else 0)
        geometry = TissueGeometry(rasterize(layout, *world, None), world_fov)
        kinds = [ACTOR[a] for a in acts]
        if rng.random() < 0.5:
            kinds.insert(0, str(rng.choice([k for k in INSTRUMENTS if k not in kinds])))
        rests = [_pick(rng, geometry.tip_candidates(k, engaged=False, slack=1.6)) for k in kinds]
        targets = {ACTOR[a]: _pick(rng, geometry.tip_candidates(ACTOR[a], True, slack=1.6)) for a in acts}
        if any(p is None for p in rests) or any(p is None for p in targets.values()):
            continue
        break
    else:
        raise RuntimeError(f"could not plan a clip at {height}x{width} in 30 layouts")
    segments = _segments(rng, frames, fps, [*acts, "idle"])
    cameras = _camera_path(rng, frames, fps, world, (height, width))
    move = max(2, int(0.6 * fps))
    t = np.arange(frames) / fps
    tracks, taken = [], []
    for kind, rest in zip(kinds, rests, strict=True):
        waypoints = [np.array(targets[kind] if ACTOR.get(a) == kind else rest) for _, _, a in segments]
        tips = np.zeros((frames, 2))
        previous = waypoints[0]
        for (start, end, _), point in zip(segments, waypoints, strict=True):
            n = max(1, min(move, (end - start) // 2))
            u = np.clip((np.arange(start, end) - start) / n, 0, 1)
            u = u * u * (3 - 2 * u)
            tips[start:end] = previous + u[:, None] * (point - previous)
            previous = point
        for axis in range(2):  # hand tremor: a fraction of a millimetre at ~0.5 Hz
            tips[:, axis] += 0.006 * size * np.sin(2 * np.pi * rng.uniform(0.3, 0.8) * t + rng.uniform(0, 6.3))
        screen_tip = cameras[0, :, :2] @ tips[0] + cameras[0, :, 2]
        angle, entry = choose_entry(rng, (float(screen_tip[0]), float(screen_tip[1])), fov, taken)
        taken.append(angle)
        tracks.append(Track(kind, entry, sample_pose_style(rng, kind, size), tips))
    return ClipPlan(height, width, fps, frames, fov, world, layout, cameras, tracks, segments)

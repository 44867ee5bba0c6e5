"""Endoscopy-like frame renderer (numpy + OpenCV) for the synthetic EndoARSS-layout dataset and clips.

A frame is composed in layers, all vectorised over pixels:

1. tissue: pink-red mucosa from multi-octave value noise, a noise height field lit from the scope (Lambert),
   branching dark-red vessels, fat patches, blood-stained streaks, a raised nodular lesion (pale, purple or
   yellowish, with a hyperaemic rim), glossy blood pools, and specular glints that favour wet surfaces;
2. consequences of the derived activity (scene.py has the rule), sized to stay visible at the tiny config's 96 px
   (3/8 of 256; at 1/2-resolution sizes a tiny ViT from scratch learnt instrument presence but not the cues): a char
   spot under a cauterising hook, a pale tented patch with radial folds at closed grasper jaws, an incision (dark
   line in a pale coagulated rim) along the lesion edge at open scissors, froth and ripples around a suction tip;
   old char spots and faint haze appear on some other frames as distractors;
3. instruments, analytic shapes in the instrument's own (along, across) frame with cylinder shading (ambient,
   diffuse, a specular stripe, a tint reflected from the tissue) and a soft contact shadow: grasper (black shaft,
   two fenestrated steel jaws), curved scissors (steel shaft, orange insulating sleeve, two curved blades),
   hook electrode (white insulated shaft, cone, L-shaped steel tip), suction tube (translucent cream plastic, side
   holes, dark mouth) and clip applier (gun-metal shaft with steel rings, parallel jaws holding a gold clip);
4. smoke (a noisy plume around a cauterising tip plus global haze; faint haze on some other frames), then the
   endoscope: vignetting, the circular field of view (black outside), occasional motion blur, sensor noise.

Masks label the tissue classes and one class per instrument type; outside the field of view is background.
Every random draw comes from the Generator handed in, so a frame depends only on its seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from training.data.scene import (
    BLOOD,
    INSTRUMENT_CLASS,
    LESION,
    ClipPlan,
    FieldOfView,
    InstrumentPose,
    Scene,
    TissueGeometry,
    TissueLayout,
    derive_activity,
    fill_polygon,
    rasterize,
    sample_scene,
)

# Material table: base RGB, ambient, diffuse, specular strength, specular stripe width (in half-widths).
MATERIALS: dict[str, tuple[tuple[float, float, float], float, float, float, float]] = {
    "black": ((0.09, 0.09, 0.11), 0.4, 0.6, 0.35, 0.22),
    "steel": ((0.58, 0.60, 0.63), 0.35, 0.65, 0.85, 0.16),
    "polished": ((0.74, 0.74, 0.77), 0.3, 0.7, 1.0, 0.12),
    "white": ((0.84, 0.85, 0.82), 0.5, 0.5, 0.3, 0.35),
    "sleeve": ((0.88, 0.56, 0.28), 0.45, 0.55, 0.35, 0.3),
    "gunmetal": ((0.30, 0.34, 0.42), 0.35, 0.65, 0.6, 0.18),
    "tube": ((0.92, 0.87, 0.62), 0.55, 0.45, 0.6, 0.25),
    "gold": ((0.86, 0.68, 0.28), 0.35, 0.65, 0.9, 0.15),
    "dark": ((0.10, 0.06, 0.06), 1.0, 0.0, 0.0, 1.0),
}
METALLIC = ("steel", "polished", "gold", "gunmetal")
TISSUE_TINT = np.array([0.9, 0.35, 0.3], np.float32)
TRANSLUCENT = {"tube": 0.78}  # opacity of see-through materials
LESION_PALETTES = ((0.93, 0.74, 0.70), (0.62, 0.33, 0.50), (0.92, 0.85, 0.74))


@dataclass
class Effects:
    """Per-frame artefacts and endoscope settings."""

    smoke: float = 0.0
    smoke_center: tuple[float, float] | None = None
    smoke_sigma: float = 0.3
    haze: float = 0.0
    burns: list[tuple[float, float, float]] = field(default_factory=list)  # x y radius
    blur: tuple[int, float] | None = None  # motion blur length (px), angle (rad)
    noise: float = 0.01
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    smoke_noise: np.ndarray | None = None  # H W in [0, 1]


@dataclass
class RenderedFrame:
    image: np.ndarray  # H W 3 uint8 RGB
    mask: np.ndarray  # H W uint8 class index
    activity: str
    scene: Scene


@dataclass
class ClipFrame:
    image: np.ndarray
    mask: np.ndarray
    activity: str
    index: int
    time: float
    instruments: list[InstrumentPose]


# ------------------------------------------------------------------------------------------------- noise, light
def fractal_noise(
    rng: np.random.Generator,
    height: int,
    width: int,
    cells: float,
    octaves: int = 3,
    persistence: float = 0.5,
    reference: int | None = None,
) -> np.ndarray:
    """Multi-octave value noise in about [0, 1]: random grids (`cells` per `reference` pixels, default the
    smaller side) upsampled bicubically."""
    size = reference or min(height, width)
    out = np.zeros((height, width), np.float32)
    amplitude, total = 1.0, 0.0
    for octave in range(octaves):
        c = cells * 2**octave
        gh, gw = max(2, math.ceil(c * height / size) + 1), max(2, math.ceil(c * width / size) + 1)
        grid = rng.random((gh, gw), dtype=np.float32)
        out += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude
        amplitude *= persistence
    return out / total


def smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def lambert(height_field: np.ndarray, strength: float, light: tuple[float, float]) -> np.ndarray:
    """Diffuse shading of a height field lit from near the camera (the scope carries the light)."""
    gx = cv2.Sobel(height_field, cv2.CV_32F, 1, 0, ksize=3) * (strength / 8)
    gy = cv2.Sobel(height_field, cv2.CV_32F, 0, 1, ksize=3) * (strength / 8)
    lx, ly = light
    norm = math.sqrt(lx * lx + ly * ly + 1)
    return np.clip((-gx * lx - gy * ly + 1) / (np.sqrt(gx * gx + gy * gy + 1) * norm), 0, 1)


def _lerp(rgb: np.ndarray, color: np.ndarray | tuple[float, ...], alpha: np.ndarray) -> None:
    """In place: rgb <- rgb + alpha * (color - rgb), rgb planar 3 H W, alpha H W, color RGB or 3 H W."""
    color = np.asarray(color, np.float32)
    rgb += alpha[None] * ((color[:, None, None] if color.ndim == 1 else color) - rgb)


def _rgb(values: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """A colour as a 3 1 1 array, to broadcast over planar images."""
    return np.asarray(values, np.float32).reshape(3, 1, 1)


def _soft_fill(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    layer = np.zeros(shape, np.uint8)
    cv2.fillPoly(layer, [np.round(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    return layer.astype(np.float32) / 255


# ------------------------------------------------------------------------------------------------------ tissue
def _vessels(
    rng: np.random.Generator, shape: tuple[int, int], count: int, width: tuple[float, float], size: int
) -> np.ndarray:
    """Branching vessel trees as anti-aliased polylines, branches thinner than their parent; coverage in [0, 1]."""
    height, w = shape
    layer = np.zeros(shape, np.uint8)
    for _ in range(count):
        stack = [(rng.uniform(0, w), rng.uniform(0, height), rng.uniform(0, 2 * np.pi), size * rng.uniform(*width), 0)]
        while stack:
            x, y, angle, thickness, depth = stack.pop()
            steps = int(rng.integers(8, 20))
            angles = angle + np.cumsum(rng.normal(0, 0.3, steps))
            xs = x + 0.025 * size * np.concatenate([[0.0], np.cumsum(np.cos(angles))])
            ys = y + 0.025 * size * np.concatenate([[0.0], np.cumsum(np.sin(angles))])
            points = np.round(np.stack([xs, ys], axis=1) * 16).astype(np.int32)
            cv2.polylines(layer, [points], False, 255, max(1, round(thickness)), cv2.LINE_AA, shift=4)
            branches = np.flatnonzero(rng.random(steps) < 0.12) if depth < 2 else []
            for i in branches:
                turn = float(rng.choice((-1, 1))) * rng.uniform(0.4, 1.0)
                stack.append((xs[i + 1], ys[i + 1], angles[i] + turn, thickness * 0.65, depth + 1))
    return cv2.GaussianBlur(layer.astype(np.float32) / 255, (0, 0), 0.7)


def render_tissue(
    rng: np.random.Generator, layout: TissueLayout, height: int, width: int, size: int | None = None
) -> np.ndarray:
    """Tissue colour (planar 3 H W float32 in [0, 1]) for `layout`; labels come from `scene.rasterize`.

    Args:
        size: pixels per unit of texture scale (default: the smaller side); clips pass the frame's, so a larger
            canvas gets more texture rather than bigger texture.
    """
    size = size or min(height, width)
    shape = (height, width)

    def noise(cells: float, octaves: int, persistence: float = 0.5) -> np.ndarray:
        return fractal_noise(rng, height, width, cells, octaves, persistence, reference=size)

    pink = _rgb((0.87, 0.50, 0.46)) * _rgb(rng.uniform(0.92, 1.06, 3))
    red = _rgb((0.66, 0.20, 0.19)) * _rgb(rng.uniform(0.85, 1.1, 3))
    mix = smoothstep(0.3, 0.7, noise(2.5, 3))
    relief = noise(3.5, 4, 0.55)
    light = (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
    shade = lambert(relief, size * rng.uniform(1.0, 2.2), light)
    brightness = (0.45 + 0.55 * shade) * (0.7 + 0.4 * relief) * (0.9 + 0.2 * noise(40, 2))
    rgb = (pink + (red - pink) * mix[None]) * brightness[None]
    density = height * width / size**2
    vessels = _vessels(rng, shape, int(rng.integers(3, 8) * density), (0.006, 0.014), size)
    _lerp(rgb, (0.40, 0.04, 0.09), 0.6 * vessels)
    deep = _vessels(rng, shape, int(rng.integers(2, 5) * density), (0.004, 0.008), size)
    _lerp(rgb, (0.45, 0.20, 0.35), 0.35 * cv2.GaussianBlur(deep, (0, 0), 1.2))
    for patch in layout.fat:  # smooth, glossy, saturated yellow: unlike the textured lesion
        sy, sx = _polygon_box(patch, 0.04 * size, shape)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        local = patch - np.array([sx.start, sy.start], np.float32)
        alpha = cv2.GaussianBlur(_soft_fill((sy.stop - sy.start, sx.stop - sx.start), local), (0, 0), 0.01 * size + 0.5)
        fat = _rgb((0.97, 0.82, 0.36)) * (0.8 + 0.25 * shade[sy, sx])[None]
        _lerp(rgb[:, sy, sx], fat, 0.85 * alpha)
    if rng.random() < 0.3:  # blood-stained mucosa: thin streaks, tissue not pooled blood (so background)
        streaks = _vessels(rng, shape, int(rng.integers(1, 3)), (0.008, 0.016), size)
        _lerp(rgb, (0.5, 0.05, 0.05), 0.35 * cv2.GaussianBlur(streaks, (0, 0), 2.0))
    wet = np.zeros(shape, np.float32)
    if layout.lesion is not None:
        _lesion(rng, rgb, wet, layout, size)
    for pool in layout.pools:
        _pool(rng, rgb, wet, pool, size)
    glints = np.clip((noise(24, 1) - 0.7 + 0.06 * wet) / 0.06, 0, 1) ** 2 * shade**3
    rgb += glints[None] * (1.0 - rgb) * rng.uniform(0.6, 0.95)
    return np.clip(rgb, 0, 1, out=rgb)


def _polygon_box(polygon: np.ndarray, margin: float, shape: tuple[int, int]) -> tuple[slice, slice]:
    x0, y0 = np.floor(polygon.min(axis=0) - margin).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0) + margin).astype(int) + 1
    return slice(max(0, y0), min(shape[0], y1)), slice(max(0, x0), min(shape[1], x1))


def _lesion(rng: np.random.Generator, rgb: np.ndarray, wet: np.ndarray, layout: TissueLayout, size: int) -> None:
    """Raised nodular lesion with pits and a hyperaemic rim, worked out in its bounding box only."""
    assert layout.lesion is not None
    sy, sx = _polygon_box(layout.lesion, 0.1 * size, rgb.shape[1:])
    if sy.start >= sy.stop or sx.start >= sx.stop:
        return
    shape = (sy.stop - sy.start, sx.stop - sx.start)
    region = fill_polygon(shape, layout.lesion - np.array([sx.start, sy.start], np.float32))
    inside = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, 5)
    dome = smoothstep(0.0, 0.6 * max(float(inside.max()), 1.0), inside)
    scale = min(shape) / size
    nodules = fractal_noise(rng, *shape, 16 * scale, 2)
    relief = 0.8 * dome + 0.35 * nodules * dome
    shade = lambert(relief, size * 0.35, (0.2, -0.2))
    palette = _rgb(LESION_PALETTES[layout.palette]) * _rgb(rng.uniform(0.9, 1.07, 3))
    pits = np.where(fractal_noise(rng, *shape, 45 * scale, 1) > 0.74, 0.72, 1.0).astype(np.float32)
    color = palette * ((0.55 + 0.45 * shade) * (0.78 + 0.35 * nodules) * pits)[None]
    rim = np.exp(-outside / (0.02 * size)) * (outside > 0)
    box = rgb[:, sy, sx]
    _lerp(box, (0.62, 0.10, 0.10), 0.45 * rim)
    _lerp(box, color, np.clip(inside / 1.5, 0, 1))
    wet[sy, sx] += region


def _pool(rng: np.random.Generator, rgb: np.ndarray, wet: np.ndarray, polygon: np.ndarray, size: int) -> None:
    """Glossy blood pool, darker where deeper."""
    sy, sx = _polygon_box(polygon, 2, rgb.shape[1:])
    if sy.start >= sy.stop or sx.start >= sx.stop:
        return
    shape = (sy.stop - sy.start, sx.stop - sx.start)
    region = fill_polygon(shape, polygon - np.array([sx.start, sy.start], np.float32))
    depth = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
    darkening = 1 - 0.4 * smoothstep(0.0, 0.06 * size, depth)
    base = _rgb((0.46, 0.03, 0.03)) * rng.uniform(0.85, 1.15)
    ripple = 0.9 + 0.2 * fractal_noise(rng, *shape, 12 * min(shape) / size, 2)
    color = base * (darkening * ripple)[None]
    _lerp(rgb[:, sy, sx], color, np.clip(depth / 1.5, 0, 1))
    wet[sy, sx] += 2 * region


# ------------------------------------------------------------------------------------------ activity cues
def _box(
    center: tuple[float, float], radius: float, shape: tuple[int, ...]
) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Slices of the square around `center` plus the pixel coordinates inside it (for local effects)."""
    x0, x1 = max(0, int(center[0] - radius)), min(shape[1], int(center[0] + radius) + 1)
    y0, y1 = max(0, int(center[1] - radius)), min(shape[0], int(center[1] + radius) + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return slice(y0, y1), slice(x0, x1), xs, ys


def _burn(rgb: np.ndarray, x: float, y: float, radius: float) -> None:
    sy, sx, xs, ys = _box((x, y), 2.5 * radius, rgb.shape[1:])
    if xs.size == 0:
        return
    d = np.sqrt((xs - x) ** 2 + (ys - y) ** 2)
    region = rgb[:, sy, sx]
    _lerp(region, (0.9, 0.86, 0.76), 0.55 * np.exp(-((d - radius) ** 2) / (2 * (0.3 * radius) ** 2)))
    _lerp(region, (0.16, 0.09, 0.06), 0.88 * np.exp(-(d**2) / (2 * (0.55 * radius) ** 2)))


def _folds(rng: np.random.Generator, rgb: np.ndarray, pose: InstrumentPose, size: int) -> None:
    """Tissue lifted by closed jaws: a paler tented patch and radial tension folds converging on the tip."""
    reach = 0.18 * size
    sy, sx, xs, ys = _box(pose.tip, reach, rgb.shape[1:])
    if xs.size == 0:
        return
    region = rgb[:, sy, sx]
    d2 = (xs - pose.tip[0]) ** 2 + (ys - pose.tip[1]) ** 2
    _lerp(region, (0.97, 0.80, 0.76), 0.6 * np.exp(-d2 / (2 * (0.08 * size) ** 2)))
    layer = np.zeros(xs.shape, np.uint8)
    back = math.atan2(pose.entry[1] - pose.tip[1], pose.entry[0] - pose.tip[0])
    cx, cy = pose.tip[0] - sx.start, pose.tip[1] - sy.start
    for _ in range(int(rng.integers(6, 10))):
        angle = back + math.pi + rng.uniform(-1.9, 1.9)
        r0, r1 = 0.02 * size, reach * rng.uniform(0.6, 0.95)
        p0 = (round((cx + r0 * math.cos(angle)) * 16), round((cy + r0 * math.sin(angle)) * 16))
        p1 = (round((cx + r1 * math.cos(angle)) * 16), round((cy + r1 * math.sin(angle)) * 16))
        cv2.line(layer, p0, p1, 255, max(1, round(0.022 * size)), cv2.LINE_AA, 4)
    folds = cv2.GaussianBlur(layer.astype(np.float32) / 255, (0, 0), 0.004 * size + 0.6)
    region *= (1 - 0.6 * folds)[None]


def _incision(rgb: np.ndarray, tissue: np.ndarray, pose: InstrumentPose, size: int) -> None:
    """A fresh cut along the lesion edge near the scissors' tip: a dark red line in a pale coagulated rim."""
    sy, sx, _, _ = _box(pose.tip, 0.24 * size, rgb.shape[1:])
    lesion = (tissue[sy, sx] == LESION).astype(np.uint8)
    contours, _ = cv2.findContours(lesion, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    tip = (pose.tip[0] - sx.start, pose.tip[1] - sy.start)
    for width, color, strength in ((0.06, (0.95, 0.82, 0.78), 0.8), (0.03, (0.30, 0.0, 0.02), 0.95)):
        layer = np.zeros_like(lesion)
        for contour in contours:
            points = contour[:, 0, :]
            near = np.hypot(points[:, 0] - tip[0], points[:, 1] - tip[1]) < 0.2 * size
            for i in np.flatnonzero(near[:-1] & near[1:]):
                p0, p1 = tuple(int(v) for v in points[i]), tuple(int(v) for v in points[i + 1])
                cv2.line(layer, p0, p1, 255, max(1, round(width * size)))
        cut = cv2.GaussianBlur(layer.astype(np.float32) / 255, (0, 0), 0.6)
        _lerp(rgb[:, sy, sx], color, strength * cut)


def _ripples(rgb: np.ndarray, tissue: np.ndarray, pose: InstrumentPose, size: int) -> None:
    """Blood drawn into a suction tip: pink froth at the mouth and concentric ripples, inside the pool only."""
    reach = 0.15 * size
    sy, sx, xs, ys = _box(pose.tip, reach, rgb.shape[1:])
    if xs.size == 0:
        return
    d = np.sqrt((xs - pose.tip[0]) ** 2 + (ys - pose.tip[1]) ** 2) / reach
    blood = tissue[sy, sx] == BLOOD
    rings = (0.5 + 0.5 * np.cos(d * 7 * np.pi)) ** 4 * np.clip(1 - d, 0, 1)
    froth = np.exp(-((d / 0.3) ** 2))
    _lerp(rgb[:, sy, sx], (0.95, 0.62, 0.60), blood * np.clip(0.95 * froth + 0.7 * rings, 0, 1))


# ------------------------------------------------------------------------------------------------ instruments
def _capsule(
    a: np.ndarray, b: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and across-coordinate u of a tapered capsule from p0 to p1 in (along, across) coordinates."""
    da, db = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(da * da + db * db, 1e-6)
    t = np.clip(((a - p0[0]) * da + (b - p0[1]) * db) / length2, 0, 1)
    dx, dy = a - (p0[0] + t * da), b - (p0[1] + t * db)
    width = w0 + t * (w1 - w0)
    coverage = np.clip(width - np.sqrt(dx * dx + dy * dy) + 0.5, 0, 1)
    length = math.sqrt(length2)
    u = (-dx * db + dy * da) / length / np.maximum(width, 0.5)
    return coverage, u


def _shaft(a: np.ndarray, b: np.ndarray, start: float, half: float, size: float) -> tuple[np.ndarray, np.ndarray]:
    """The shaft from `start` (along-coordinate) back to the entry, widening towards the camera (perspective)."""
    h = half * (1 + 0.35 * np.maximum(a - start, 0) / size)
    coverage = np.clip(h - np.abs(b) + 0.5, 0, 1) * np.clip(a - start + 0.5, 0, 1)
    return coverage, b / h


Part = tuple[np.ndarray, np.ndarray, str]


def _shaft_parts(pose: InstrumentPose, a: np.ndarray, b: np.ndarray, size: float) -> list[Part]:
    """Shaft parts over the whole instrument box: (coverage, u, material), back to front."""
    h, tip = pose.half_width, pose.tip_length
    if pose.kind == "scissors":
        coverage, u = _shaft(a, b, tip, h, size)
        sleeve = (a < tip + 1.4 * h).astype(np.float32)
        return [(coverage * (1 - sleeve), u, "steel"), (coverage * sleeve, u, "sleeve")]
    if pose.kind == "clip_applier":
        coverage, u = _shaft(a, b, tip, h, size)
        phase = (a - tip - 0.8 * h) % (1.6 * h)
        ring = ((phase < 0.45 * h) & (a > tip + 0.5 * h) & (a < tip + 7 * h)).astype(np.float32)
        return [(coverage * (1 - ring), u, "gunmetal"), (coverage * ring, u, "steel")]
    material = {"grasper": "black", "hook": "white", "suction_tube": "tube"}[pose.kind]
    return [(*_shaft(a, b, tip, h, size), material)]


class _TipWindow:
    """(along, across) coordinates of a window around the tip; each capsule is evaluated in its own sub-box."""

    def __init__(self, pose: InstrumentPose, x0: int, x1: int, y0: int, y1: int) -> None:
        self.a, self.b = _local_frame(pose, x0, x1, y0, y1)
        dx, dy = pose.tip[0] - pose.entry[0], pose.tip[1] - pose.entry[1]
        norm = math.hypot(dx, dy) or 1.0
        self.d, self.origin = (dx / norm, dy / norm), (pose.tip[0] - x0, pose.tip[1] - y0)

    def capsule(
        self, p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float
    ) -> tuple[np.ndarray, np.ndarray]:
        (dx, dy), (ox, oy) = self.d, self.origin
        # (along, across) -> window pixels: P = tip - along * d + across * n, with n = (-dy, dx).
        xs = [ox - p[0] * dx - p[1] * dy for p in (p0, p1)]
        ys = [oy - p[0] * dy + p[1] * dx for p in (p0, p1)]
        r = max(w0, w1) + 1.5
        height, width = self.a.shape
        x0, x1 = max(0, int(min(xs) - r)), min(width, int(max(xs) + r) + 1)
        y0, y1 = max(0, int(min(ys) - r)), min(height, int(max(ys) + r) + 1)
        coverage, u = np.zeros_like(self.a), np.zeros_like(self.a)
        if x0 < x1 and y0 < y1:
            c, v = _capsule(self.a[y0:y1, x0:x1], self.b[y0:y1, x0:x1], p0, p1, w0, w1)
            coverage[y0:y1, x0:x1], u[y0:y1, x0:x1] = c, v
        return coverage, u


def _tip_parts(pose: InstrumentPose, window: _TipWindow) -> list[Part]:
    """Parts near the tip (which sits at along = across = 0)."""
    h, tip, side = pose.half_width, pose.tip_length, pose.side
    cap = window.capsule
    parts: list[Part] = []
    if pose.kind == "grasper":  # wrist joint and two fenestrated jaws
        parts.append((*cap((tip + 0.2 * h, 0), (tip - 0.35 * h, 0), 0.85 * h, 0.75 * h), "steel"))
        spread = math.sin(math.radians(22) * pose.opening) * tip
        for i in (-1, 1):
            p0, p1 = (tip - 0.2 * h, i * 0.3 * h), (0.0, i * (0.22 * h + spread))
            parts.append((*cap(p0, p1, 0.42 * h, 0.2 * h), "steel"))
            q0 = (p0[0] + 0.3 * (p1[0] - p0[0]), p0[1] + 0.3 * (p1[1] - p0[1]))
            q1 = (p0[0] + 0.72 * (p1[0] - p0[0]), p0[1] + 0.72 * (p1[1] - p0[1]))
            parts.append((*cap(q0, q1, 0.14 * h, 0.08 * h), "dark"))
    elif pose.kind == "scissors":  # two curved, tapering blades and the pivot screw
        spread = math.sin(math.radians(18) * pose.opening)
        ts = np.linspace(0, 1, 4)
        widths = [0.45 * h * (1 - t) + 0.08 * h for t in ts]
        for i in (-1, 1):
            pts = [(tip * (1 - t), side * 0.6 * tip * t * (1 - t) + i * spread * tip * t) for t in ts]
            for k in range(3):
                parts.append((*cap(pts[k], pts[k + 1], widths[k], widths[k + 1]), "polished"))
        parts.append((*cap((tip, 0), (tip, 0), 0.32 * h, 0.32 * h), "dark"))
    elif pose.kind == "hook":  # insulating cone, bare rod, L-shaped electrode
        parts.append((*cap((tip, 0), (0.55 * tip, 0), 0.95 * h, 0.35 * h), "white"))
        parts.append((*cap((0.6 * tip, 0), (0.0, 0.0), 0.26 * h, 0.26 * h), "steel"))
        parts.append((*cap((0.0, 0.0), (0.25 * h, side * 1.25 * h), 0.26 * h, 0.24 * h), "steel"))
    elif pose.kind == "suction_tube":  # dark mouth and side holes of the cannula
        parts.append((*cap((0.2 * h, -0.65 * h), (0.2 * h, 0.65 * h), 0.18 * h, 0.18 * h), "dark"))
        for k in (1, 2, 3):
            parts.append((*cap((1.7 * k * h, 0), (1.7 * k * h, 0), 0.26 * h, 0.26 * h), "dark"))
    elif pose.kind == "clip_applier":  # heel, two parallel jaws, a gold clip held between them
        parts.append((*cap((tip, -0.55 * h), (tip, 0.55 * h), 0.32 * h, 0.32 * h), "steel"))
        gap = 0.45 * h + 0.35 * h * pose.opening
        for i in (-1, 1):
            parts.append((*cap((tip, i * 0.55 * h), (0.05 * tip, i * gap), 0.3 * h, 0.24 * h), "steel"))
            clip = cap((0.75 * tip, i * 0.22 * h), (0.15 * tip, i * 0.1 * h), 0.1 * h, 0.08 * h)
            parts.append((*clip, "gold"))
        parts.append((*cap((0.75 * tip, -0.22 * h), (0.75 * tip, 0.22 * h), 0.1 * h, 0.1 * h), "gold"))
    else:
        raise ValueError(f"unknown instrument kind {pose.kind!r}; known: {tuple(INSTRUMENT_CLASS)}")
    return parts


def _tip_reach(pose: InstrumentPose) -> float:
    """Radius around the tip that holds every tip part (suction holes reach 5.4 half-widths back)."""
    return max(pose.tip_length, 5.6 * pose.half_width) + 2 * pose.half_width + 2


def _material(name: str, u: np.ndarray, pose: InstrumentPose) -> np.ndarray:
    base, ambient, diffuse, specular, width = MATERIALS[name]
    nz = np.sqrt(np.clip(1 - u * u, 0, 1))
    color = np.asarray(base, np.float32)[:, None] * (pose.shade * (ambient + diffuse * nz))[None]
    color += (specular * np.exp(-(((u - 0.6 * pose.highlight) / width) ** 2)))[None]
    if name in METALLIC:
        color += (0.12 * (1 - nz))[None] * TISSUE_TINT[:, None]
    return color


def _paint(region: np.ndarray, parts: list[Part], pose: InstrumentPose) -> np.ndarray:
    """Composite `parts` onto `region` (in place), shading only covered pixels; returns the total coverage."""
    coverage = np.max([p[0] for p in parts], axis=0)
    covered = coverage > 0
    if not covered.any():
        return coverage
    pixels = region[:, covered]  # 3 N
    for part_coverage, u, name in parts:
        alpha = part_coverage[covered] * TRANSLUCENT.get(name, 1.0)
        hit = alpha > 0
        if hit.any():
            color = _material(name, u[covered][hit], pose)
            pixels[:, hit] += alpha[hit][None] * (color - pixels[:, hit])
    region[:, covered] = pixels
    return coverage


def _local_frame(pose: InstrumentPose, x0: int, x1: int, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """(along, across) coordinates of the pixels of a box: along is 0 at the tip and grows towards the entry."""
    tx, ty = pose.tip
    dx, dy = tx - pose.entry[0], ty - pose.entry[1]
    norm = math.hypot(dx, dy) or 1.0
    dx, dy = dx / norm, dy / norm
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (tx - xs) * dx + (ty - ys) * dy, (xs - tx) * -dy + (ys - ty) * dx


def draw_instrument(rgb: np.ndarray, mask: np.ndarray, pose: InstrumentPose, size: int) -> None:
    """Draw `pose` onto `rgb` (float, in place) and its class into `mask` where its coverage is at least 1/2."""
    height, width = mask.shape
    tx, ty = pose.tip
    dx, dy = tx - pose.entry[0], ty - pose.entry[1]
    norm = math.hypot(dx, dy) or 1.0
    far = (pose.entry[0] - dx / norm * size, pose.entry[1] - dy / norm * size)
    reach = _tip_reach(pose)
    pad = 2.5 * pose.half_width + 2
    x0, x1 = max(0, int(min(tx - reach, far[0] - pad))), min(width, int(max(tx + reach, far[0] + pad)) + 1)
    y0, y1 = max(0, int(min(ty - reach, far[1] - pad))), min(height, int(max(ty + reach, far[1] + pad)) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    a, b = _local_frame(pose, x0, x1, y0, y1)
    shaft = _shaft_parts(pose, a, b, size)
    coverage = np.max([p[0] for p in shaft], axis=0)
    wx0, wx1 = max(x0, int(tx - reach)), min(x1, int(tx + reach) + 1)
    wy0, wy1 = max(y0, int(ty - reach)), min(y1, int(ty + reach) + 1)
    tip_parts: list[Part] = []
    if wx0 < wx1 and wy0 < wy1:
        tip_parts = _tip_parts(pose, _TipWindow(pose, wx0, wx1, wy0, wy1))
        window = coverage[wy0 - y0 : wy1 - y0, wx0 - x0 : wx1 - x0]
        np.maximum(window, np.max([p[0] for p in tip_parts], axis=0), out=window)
    region = rgb[:, y0:y1, x0:x1]
    region *= (1 - 0.4 * cv2.GaussianBlur(coverage, (0, 0), 0.012 * size + 0.5))[None]  # contact shadow
    _paint(region, shaft, pose)
    if tip_parts:
        _paint(rgb[:, wy0:wy1, wx0:wx1], tip_parts, pose)
    mask[y0:y1, x0:x1][coverage >= 0.5] = INSTRUMENT_CLASS[pose.kind]


# ------------------------------------------------------------------------------------------------- composing
def compose_frame(
    tissue_rgb: np.ndarray,
    tissue: np.ndarray,
    fov: FieldOfView,
    instruments: list[InstrumentPose],
    activity: str,
    actor: int | None,
    effects: Effects,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Activity cues, instruments, smoke and the endoscope optics on a planar tissue layer -> (H W 3 uint8, mask)."""
    height, width = tissue.shape
    size = min(height, width)
    rgb = tissue_rgb.astype(np.float32, copy=True)
    mask = tissue.copy()
    for x, y, r in effects.burns:
        _burn(rgb, x, y, r)
    if actor is not None:
        pose = instruments[actor]
        if activity == "grasping":
            _folds(rng, rgb, pose, size)
        elif activity == "cutting":
            _incision(rgb, tissue, pose, size)
        elif activity == "suction":
            _ripples(rgb, tissue, pose, size)
    for pose in instruments:
        draw_instrument(rgb, mask, pose, size)
    if effects.smoke > 0 or effects.haze > 0:
        noise = effects.smoke_noise
        if noise is None:
            noise = fractal_noise(rng, height, width, 3, 3)
        alpha = np.full((height, width), effects.haze, np.float32)
        if effects.smoke > 0 and effects.smoke_center is not None:
            ys, xs = np.ogrid[:height, :width]
            cx, cy = effects.smoke_center
            sigma = effects.smoke_sigma * size
            plume = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma * sigma)).astype(np.float32)
            alpha += effects.smoke * plume
        alpha = np.clip(alpha * (0.45 + 0.9 * noise), 0, 0.85)
        _lerp(rgb, (0.86, 0.85, 0.84), alpha)
    radius = fov.radius_map(height, width)
    optics = np.clip(1 - fov.vignette * (radius / fov.radius) ** 2, 0, 1) * np.clip(fov.radius - radius + 0.5, 0, 1)
    rgb *= optics[None] * _rgb(effects.white_balance)
    mask[radius > fov.radius] = 0
    if effects.blur is not None:
        length, angle = effects.blur
        kernel = np.zeros((length, length), np.float32)
        c = (length - 1) / 2
        dx, dy = math.cos(angle) * c, math.sin(angle) * c
        cv2.line(
            kernel,
            (round((c - dx) * 16), round((c - dy) * 16)),
            (round((c + dx) * 16), round((c + dy) * 16)),
            1.0,
            1,
            cv2.LINE_AA,
            4,
        )
        kernel /= max(float(kernel.sum()), 1e-6)
        rgb = np.stack([cv2.filter2D(plane, -1, kernel) for plane in rgb])
    if effects.noise > 0:  # sensor noise (luminance; uniform with the given standard deviation)
        rgb += ((rng.random((height, width), dtype=np.float32) - 0.5) * (effects.noise * 3.4641))[None]
    planes = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(planes.transpose(1, 2, 0)), mask


def _set_opening(rng: np.random.Generator, pose: InstrumentPose, engaged: bool) -> None:
    if pose.kind == "grasper":
        pose.opening = rng.uniform(0.0, 0.08) if engaged else rng.uniform(0.5, 1.0)
    elif pose.kind == "scissors":
        pose.opening = rng.uniform(0.7, 1.0) if engaged else rng.uniform(0.0, 0.2)
    else:
        pose.opening = rng.uniform(0.0, 0.5)


def _still_effects(rng: np.random.Generator, scene: Scene) -> Effects:
    size = min(scene.height, scene.width)
    effects = Effects(
        noise=rng.uniform(0.004, 0.015),
        white_balance=tuple(float(v) for v in rng.uniform(0.93, 1.07, 3)),  # type: ignore[arg-type]
    )
    if scene.activity == "cauterization" and scene.actor is not None:
        tip = scene.instruments[scene.actor].tip
        effects.smoke = rng.uniform(0.35, 0.75)
        effects.smoke_center = (tip[0] + rng.normal(0, 0.03 * size), tip[1] - rng.uniform(0, 0.08) * size)
        effects.smoke_sigma = rng.uniform(0.15, 0.32)
        effects.haze = rng.uniform(0.05, 0.2)
        effects.burns.append((tip[0], tip[1], 0.04 * size * rng.uniform(0.8, 1.3)))
    elif rng.random() < 0.15:
        effects.haze = rng.uniform(0.08, 0.3)
    if scene.layout.lesion is not None and rng.random() < 0.15:  # old char marks: cautery happened earlier
        for _ in range(int(rng.integers(1, 3))):
            x, y = scene.layout.lesion[int(rng.integers(len(scene.layout.lesion)))]
            effects.burns.append((float(x), float(y), 0.025 * size * rng.uniform(0.7, 1.2)))
    if rng.random() < 0.12:
        effects.blur = (int(rng.integers(3, max(4, int(0.035 * size)))), rng.uniform(0, np.pi))
    return effects


def render_scene(rng: np.random.Generator, scene: Scene) -> RenderedFrame:
    """Render a sampled still scene (instrument jaw state follows the derived activity)."""
    tissue_rgb = render_tissue(rng, scene.layout, scene.height, scene.width)
    for i, pose in enumerate(scene.instruments):
        _set_opening(rng, pose, engaged=i == scene.actor)
    effects = _still_effects(rng, scene)
    image, mask = compose_frame(
        tissue_rgb, scene.tissue, scene.fov, scene.instruments, scene.activity, scene.actor, effects, rng
    )
    return RenderedFrame(image, mask, scene.activity, scene)


def frame_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Generator for one frame: depends on (seed, stream, index) only, so any worker split gives the same bytes."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative; got seed={seed}, index={index}")
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def render_image(seed: int, index: int, height: int = 256, width: int = 256) -> RenderedFrame:
    """Frame `index` of the still-image set generated with `seed`."""
    rng = frame_rng(seed, index)
    return render_scene(rng, sample_scene(rng, height, width))


# ------------------------------------------------------------------------------------------------------ clips
def render_clip(plan: ClipPlan, rng: np.random.Generator) -> Iterator[ClipFrame]:
    """Render a planned clip frame by frame.

    The tissue canvas is rendered once and warped by the camera path; instrument tips follow their planned world
    paths, entries stay at their trocars. The rule is applied per frame on the warped tissue labels; jaw opening,
    smoke (builds up in ~0.3 s, lingers ~1 s) and char marks evolve smoothly from the per-frame activity.
    """
    height, width, size = plan.height, plan.width, min(plan.height, plan.width)
    world_rgb = render_tissue(rng, plan.layout, *plan.world_size, size=size)
    world_labels = rasterize(plan.layout, *plan.world_size, None)
    smoke_field = fractal_noise(rng, 2 * height, 2 * width, 6, 3)
    drift = rng.uniform(-1, 1, 2) * 0.004 * size
    radius = plan.fov.radius_map(height, width)
    openings = [rng.uniform(0.3, 0.9) for _ in plan.tracks]
    smoke, smoke_center = 0.0, None
    burns_world: list[tuple[float, float, float]] = []
    white_balance = tuple(float(v) for v in rng.uniform(0.95, 1.05, 3))
    noise = rng.uniform(0.004, 0.01)
    for f in range(plan.frames):
        camera = plan.cameras[f]
        tissue_rgb = np.stack(
            [
                cv2.warpAffine(plane, camera, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                for plane in world_rgb
            ]
        )
        tissue = cv2.warpAffine(world_labels, camera, (width, height), flags=cv2.INTER_NEAREST, borderValue=0)
        tissue[radius > plan.fov.radius] = 0
        poses = []
        for track, opening in zip(plan.tracks, openings, strict=True):
            tip = camera[:, :2] @ track.tips[f] + camera[:, 2]
            poses.append(
                InstrumentPose(track.kind, track.entry, (float(tip[0]), float(tip[1])), opening=opening, **track.style)
            )  # type: ignore[arg-type]
        activity, actor = derive_activity(poses, TissueGeometry(tissue, plan.fov))
        for i, pose in enumerate(poses):
            engaged = i == actor
            target = {"grasper": 0.03 if engaged else 0.7, "scissors": 0.85 if engaged else 0.15}.get(pose.kind, 0.25)
            openings[i] += 0.25 * (target - openings[i])
            pose.opening = openings[i]
        if activity == "cauterization" and actor is not None:
            smoke += 0.12 * (1 - smoke)
            smoke_center = poses[actor].tip
            if f % 6 == 0:
                inverse = cv2.invertAffineTransform(camera)
                wx, wy = inverse[:, :2] @ np.array(smoke_center) + inverse[:, 2]
                burns_world = [*burns_world[-11:], (float(wx), float(wy), 0.02 * size * rng.uniform(0.8, 1.2))]
        else:
            smoke *= 0.96
        if smoke_center is not None:
            smoke_center = (smoke_center[0], smoke_center[1] - 0.002 * size)
        burns = []
        for wx, wy, r in burns_world:
            sx, sy = camera[:, :2] @ np.array([wx, wy]) + camera[:, 2]
            burns.append((float(sx), float(sy), r))
        oy, ox = int(height / 2 + drift[1] * f) % height, int(width / 2 + drift[0] * f) % width
        effects = Effects(
            smoke=0.7 * smoke,
            smoke_center=smoke_center,
            smoke_sigma=0.25,
            haze=0.15 * smoke,
            burns=burns,
            noise=noise,
            white_balance=white_balance,  # type: ignore[arg-type]
            smoke_noise=smoke_field[oy : oy + height, ox : ox + width],
        )
        image, mask = compose_frame(tissue_rgb, tissue, plan.fov, poses, activity, actor, effects, rng)
        yield ClipFrame(image, mask, activity, f, f / plan.fps, poses)

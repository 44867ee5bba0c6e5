"""Engine outputs of one frame -> the result a client receives (a plain dict, serialised once by orjson).

Nothing here costs in proportion to the frame's pixels unless the client asked for it: the activity comes from K
probabilities, class fractions are weighted counts on the model-size class map (exactly what counting the frame-size
map would give, see `imaging.class_fractions`), and the mask goes out at the model's grid unless `mask_size=frame`
or an overlay is asked for. The pydantic models in `schemas.py` describe the same shape for OpenAPI and clients; the
hot path does not build them, because validating a result the server has just built only costs time.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service import imaging
from service.bundle import Bundle
from service.schemas import MaskFormat, MaskSize

# The compact response: a little-endian uint32 length N, N bytes of the JSON result, then the class map's
# mask_height x mask_width bytes, row-major (README "Compact responses").
RAW_MEDIA_TYPE = "application/vnd.endostream.result"
_LENGTH_BYTES = 4


@dataclass(frozen=True)
class InferOptions:
    """What the client asked for: mask encoding and size, tasks to return, an overlay image instead of JSON."""

    mask: MaskFormat = "png"
    mask_size: MaskSize = "model"
    tasks: frozenset[str] | None = None  # None: every task of the bundle
    overlay: str | None = None  # "png" | "jpeg": return the annotated frame
    include_frame: bool = False  # add the (JPEG) source frame to the JSON (viewer of a stream)

    @property
    def needs_frame_pixels(self) -> bool:
        """Whether building the result touches every pixel of the frame (then it is worth a worker thread)."""
        return self.overlay is not None or self.include_frame or (self.mask != "none" and self.mask_size == "frame")


@dataclass
class Outcome:
    """A processed frame: the result dict, the raw class map for `mask=raw`, the overlay image when asked for."""

    result: dict[str, Any]
    mask: np.ndarray | None = None  # uint8 class map the compact response carries after its JSON
    image: bytes | None = None

    def json(self) -> bytes:
        return orjson.dumps(self.result, option=orjson.OPT_SERIALIZE_NUMPY)

    def compact(self) -> bytes:
        """The `mask=raw` body: length-prefixed JSON, then the class map's bytes."""
        header = self.json()
        mask = b"" if self.mask is None else np.ascontiguousarray(self.mask).tobytes()
        return len(header).to_bytes(_LENGTH_BYTES, "little") + header + mask


def decode_compact(body: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
    """Client side of `mask=raw`: (result, class map or None). Also what the tests use to check the format."""
    size = int.from_bytes(body[:_LENGTH_BYTES], "little")
    result = orjson.loads(body[_LENGTH_BYTES : _LENGTH_BYTES + size])
    seg = result.get("segmentation")
    if not seg or seg.get("mask_format") != "raw":
        return result, None
    mask = np.frombuffer(body, np.uint8, offset=_LENGTH_BYTES + size)
    return result, mask.reshape(seg["height"], seg["width"])


class ResultBuilder:
    """Turns one frame's engine outputs into its result for one bundle (activity, segmentation, overlay)."""

    def __init__(self, bundle: Bundle) -> None:
        self.activity_task = bundle.task_of_kind("classification")
        self.segmentation_task = bundle.task_of_kind("segmentation")
        seg = self.segmentation_task
        self.palette = imaging.palette(seg.colors, len(seg.classes)) if seg else None

    def activity(self, outputs: dict[str, np.ndarray], wanted: frozenset[str] | None) -> dict[str, Any] | None:
        act = self.activity_task
        if act is None or (wanted is not None and act.name not in wanted):
            return None
        raw = outputs[act.output]
        index = int(raw.argmax())
        probs = [round(p, 6) for p in raw.astype(float).tolist()]
        return {
            "task": act.name,
            "label": act.classes[index],
            "index": index,
            "confidence": probs[index],
            "probabilities": dict(zip(act.classes, probs, strict=True)),
        }

    def segmentation(
        self, outputs: dict[str, np.ndarray], options: InferOptions, frame_height: int, frame_width: int
    ) -> tuple[dict[str, Any] | None, np.ndarray | None]:
        """(the segmentation result without its encoded mask, the class map at the size the client asked for)."""
        seg = self.segmentation_task
        if seg is None or (options.tasks is not None and seg.name not in options.tasks):
            return None, None
        small = outputs[seg.output]
        fractions = imaging.class_fractions(small, len(seg.classes), frame_height, frame_width)
        present = [
            {"index": int(i), "name": seg.classes[i], "fraction": round(float(fractions[i]), 6)}
            for i in np.argsort(-fractions, kind="stable")
            if fractions[i] > 0
        ]
        at_frame = options.mask_size == "frame" or options.overlay is not None
        mask = None
        if options.mask != "none" or options.overlay is not None:
            mask = imaging.resize_mask(small, frame_height, frame_width) if at_frame else small
        height, width = (frame_height, frame_width) if at_frame else small.shape
        result = {
            "task": seg.name,
            "height": int(height),
            "width": int(width),
            "mask_size": "frame" if at_frame else "model",
            "classes": present,
            "mask_format": "none",
            "mask": None,
        }
        return result, mask

    def encode_mask(self, seg_result: dict[str, Any], mask: np.ndarray, fmt: MaskFormat) -> None:
        """Put `mask` into the result in `fmt` (raw: only the format; the bytes travel after the JSON)."""
        seg_result["mask_format"] = fmt
        if fmt == "png":
            seg_result["mask"] = imaging.encode_mask_png(mask)
        elif fmt == "rle":
            seg_result["mask"] = imaging.encode_mask_rle(mask)

    def overlay(
        self,
        frame: np.ndarray,
        mask: np.ndarray | None,
        activity: dict[str, Any] | None,
        fmt: str,
        height: int,
        width: int,
    ) -> bytes:
        label = f"{activity['label']} {activity['confidence']:.0%}" if activity else None
        full = frame if frame.shape[:2] == (height, width) else imaging.resize_for_model(frame, height, width)
        return imaging.encode_image(imaging.draw_overlay(full, mask, self.palette, label), fmt)


def frame_jpeg(frame: np.ndarray) -> str:
    """The source frame as base64 JPEG (quality 80), for viewers of a stream."""
    return base64.b64encode(imaging.encode_image(frame, "jpeg", 80)).decode("ascii")

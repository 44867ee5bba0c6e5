"""Frame decoding, resizing to the model size, mask resizing and encoding, overlays. numpy + OpenCV + Pillow only.

Decoding reads the header first, so a frame over the pixel limit is refused before a byte of it is decoded, and a
JPEG is decoded straight at the smallest DCT scale that still covers the model input (libjpeg's scaled IDCT is
25-35 % cheaper than a full decode followed by a shrink, and the model never sees the lost detail).
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import BadInput

FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp"}
JPEG_MAGIC = b"\xff\xd8\xff"  # SOI + the first marker's 0xFF
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class DecodedFrame:
    """An RGB frame ready for resizing; `width` x `height` is the original size (masks come back at this size)."""

    image: np.ndarray  # h x w x 3 uint8 RGB, possibly DCT-reduced
    width: int
    height: int
    format: str


def decode_image(data: bytes, *, max_pixels: int, min_size: tuple[int, int] | None = None) -> DecodedFrame:
    """Decode JPEG/PNG/BMP bytes to RGB.

    Args:
        data: the encoded frame.
        max_pixels: refuse frames with more pixels than this (checked from the header, before decoding).
        min_size: (height, width) the decoded image must still cover when a JPEG is decoded at a reduced scale;
            None decodes at full size.

    Raises:
        BadInput: empty, unknown or corrupt data, or a frame over the pixel limit.
    """
    image = open_image(data, max_pixels=max_pixels)
    width, height = image.size
    if image.format == "JPEG" and min_size is not None:
        scale = _jpeg_scale(width, height, min_size)
        if scale > 1:
            image.draft("RGB", (-(-width // scale), -(-height // scale)))
    try:
        rgb = image.convert("RGB")
        rgb.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure is the frame's fault: a 400 naming it, never a 500
        raise corrupt(image.format, err) from None
    return DecodedFrame(np.asarray(rgb), width, height, image.format)


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """The frame's header read by Pillow's JPEG, PNG or BMP plugin only, checked against the pixel limit.

    Raises:
        BadInput: empty body, another format, a header no plugin accepts, or a frame over the pixel limit.
    """
    if not data:
        raise BadInput("empty_body", "the request body is empty: send a JPEG, PNG or BMP frame")
    try:
        # `formats` keeps every other Pillow plugin (and its parser's bugs) away from client bytes
        image = Image.open(io.BytesIO(data), formats=tuple(FORMATS))
    except Image.DecompressionBombError as err:  # Pillow's own guard fires at twice its limit, before ours
        raise BadInput(
            "too_many_pixels", f"{err}; the limit is {max_pixels} pixels (ENDOSTREAM_MAX_PIXELS)", param="image"
        ) from None
    except UnidentifiedImageError:
        raise BadInput("not_an_image", f"the body ({len(data)} bytes) is not a JPEG, PNG or BMP image") from None
    except Exception as err:  # noqa: BLE001 - a plugin rejecting its header (OSError, ValueError, SyntaxError...)
        raise BadInput("corrupt_image", f"the frame's header could not be read: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(
            "too_many_pixels",
            f"frame is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (ENDOSTREAM_MAX_PIXELS)",
            param="image",
            value=f"{width}x{height}",
        )
    if width < 1 or height < 1:
        raise BadInput("bad_size", f"frame size {width}x{height} is empty")
    return image


def check_header(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header, with the checks of `open_image`, decoding nothing."""
    return open_image(data, max_pixels=max_pixels).size


def corrupt(fmt: str | None, err: BaseException) -> BadInput:
    """The 400 for a frame whose header was fine but whose data a decoder refused."""
    return BadInput("corrupt_image", f"the {fmt or 'image'} frame could not be decoded: {err}")


def _jpeg_scale(width: int, height: int, min_size: tuple[int, int]) -> int:
    """Largest libjpeg scale denominator (1, 2, 4, 8) keeping the image at least `min_size` (h, w)."""
    scale = 1
    for candidate in (2, 4, 8):
        if height // candidate >= min_size[0] and width // candidate >= min_size[1]:
            scale = candidate
    return scale


def resize_for_model(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize RGB `image` to the model size the way training did (area when shrinking, bilinear when enlarging)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return np.ascontiguousarray(image)
    shrink = h * w > height * width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Class map to the frame size; nearest-exact samples pixel centres and never invents a class."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def class_fractions(
    mask: np.ndarray, num_classes: int, height: int | None = None, width: int | None = None
) -> np.ndarray:
    """Share of pixels of each class (length `num_classes`) in `mask` resized to `height` x `width` by `resize_mask`.

    Computed on the small model-size map, exactly: nearest-exact resizing repeats source row `i` `rows[i]` times and
    column `j` `cols[j]` times, so each source pixel stands for `rows[i] * cols[j]` output pixels. A 96 x 96 map
    costs microseconds where counting the 1080p map costs milliseconds.
    """
    h, w = mask.shape
    height, width = height or h, width or w
    counts = np.bincount(mask.ravel(), weights=_pixel_weights(h, w, height, width), minlength=num_classes)
    return counts[:num_classes] / float(height * width)


@functools.lru_cache(maxsize=16)
def _pixel_weights(h: int, w: int, height: int, width: int) -> np.ndarray:
    """Output pixels each source pixel of an h x w map stands for at height x width (one per stream's frame size)."""
    rows = np.bincount(_nearest_exact_sources(h, height), minlength=h)
    cols = np.bincount(_nearest_exact_sources(w, width), minlength=w)
    weights = np.outer(rows, cols).ravel().astype(np.float64)
    weights.flags.writeable = False  # shared by every call for this size
    return weights


@functools.lru_cache(maxsize=64)
def _nearest_exact_sources(src: int, dst: int) -> np.ndarray:
    """Source index of each output index, asked of OpenCV itself: its fixed-point rounding differs from the exact
    formula floor((x + .5) * src / dst) for some sizes (e.g. 96 -> 1080), and the counts must match it exactly."""
    ramp = np.arange(src, dtype=np.float32)[None, :]
    return cv2.resize(ramp, (dst, 1), interpolation=cv2.INTER_NEAREST_EXACT)[0].astype(np.int64)


# Up filter + run-length zlib: a nearest-upscaled class map is runs of equal values and rows equal to the row above,
# so this is ~7x faster than OpenCV's default adaptive filtering at 1080p and the file is smaller too.
MASK_PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
]  # fmt: skip


def encode_mask_png(mask: np.ndarray) -> str:
    """Base64 single-channel PNG whose pixel values are class indices."""
    ok, buf = cv2.imencode(".png", mask, MASK_PNG_PARAMS)
    if not ok:  # pragma: no cover - OpenCV only fails on invalid arrays, which we never build
        raise RuntimeError("PNG encoding of the mask failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def encode_mask_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """Row-major run-length encoding: `values[i]` repeated `lengths[i]` times fills the mask."""
    flat = mask.ravel()
    if flat.size == 0:
        return {"values": [], "lengths": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return {"values": flat[starts].astype(int).tolist(), "lengths": lengths.astype(int).tolist()}


def decode_mask_rle(rle: dict[str, list[int]], height: int, width: int) -> np.ndarray:
    """Inverse of `encode_mask_rle` (used by clients and tests)."""
    return np.repeat(np.asarray(rle["values"], np.uint8), rle["lengths"]).reshape(height, width)


def draw_overlay(
    frame: np.ndarray, mask: np.ndarray | None, colors: np.ndarray | None, label: str | None
) -> np.ndarray:
    """The frame with non-background classes tinted in their colours and the activity label in a banner."""
    out = frame.copy()
    if mask is not None and colors is not None:
        tint = colors[mask]
        fg = mask > 0
        out[fg] = (out[fg] * (1 - OVERLAY_ALPHA) + tint[fg] * OVERLAY_ALPHA).astype(np.uint8)
    if label:
        scale = max(out.shape[1] / 900.0, 0.5)
        thickness = max(int(round(scale * 2)), 1)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        pad = int(8 * scale)
        cv2.rectangle(out, (0, 0), (tw + 2 * pad, th + base + 2 * pad), (0, 0, 0), -1)
        cv2.putText(
            out, label, (pad, th + pad), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
        )
    return out


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 85) -> bytes:
    """RGB array -> PNG or JPEG bytes."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"{fmt} encoding failed")
    return buf.tobytes()


def palette(colors: list[list[int]] | None, num_classes: int) -> np.ndarray:
    """num_classes x 3 uint8 colour table; classes without a colour get a deterministic distinct one."""
    table = np.zeros((max(num_classes, 1), 3), np.uint8)
    rng = np.random.default_rng(7)
    for i in range(num_classes):
        table[i] = colors[i] if colors and i < len(colors) else rng.integers(64, 256, 3)
    return table

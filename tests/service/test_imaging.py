"""Frame and mask helpers: exact class fractions from the small map, mask codecs, DCT-scaled JPEG decoding."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from service import imaging
from service.errors import BadInput


@pytest.mark.parametrize("small,size", [((96, 96), (1080, 1920)), ((64, 48), (480, 640)), ((7, 5), (3, 11))])
def test_class_fractions_from_the_small_map_equal_counting_the_resized_map(small, size) -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 6, size=small, dtype=np.uint8)
    resized = imaging.resize_mask(mask, *size)
    expected = np.bincount(resized.ravel(), minlength=6) / resized.size
    np.testing.assert_allclose(imaging.class_fractions(mask, 6, *size), expected, atol=1e-12)


def test_mask_png_and_rle_round_trip() -> None:
    rng = np.random.default_rng(2)
    mask = imaging.resize_mask(rng.integers(0, 9, size=(12, 16), dtype=np.uint8), 240, 320)
    png = cv2.imdecode(np.frombuffer(base64.b64decode(imaging.encode_mask_png(mask)), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, mask)
    np.testing.assert_array_equal(imaging.decode_mask_rle(imaging.encode_mask_rle(mask), 240, 320), mask)


def test_jpeg_is_decoded_at_the_smallest_scale_covering_the_model() -> None:
    rgb = np.random.default_rng(3).integers(0, 255, size=(1080, 1920, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", rgb)[1].tobytes()
    decoded = imaging.decode_image(data, max_pixels=1 << 24, min_size=(224, 224))
    assert (decoded.width, decoded.height) == (1920, 1080)  # the frame's own size is reported
    assert decoded.image.shape == (270, 480, 3)  # 1/4 scale still covers 224 x 224
    assert imaging.decode_image(data, max_pixels=1 << 24, min_size=None).image.shape == (1080, 1920, 3)
    with pytest.raises(BadInput, match="ENDOSTREAM_MAX_PIXELS"):
        imaging.decode_image(data, max_pixels=1920 * 1080 - 1)

"""Service test fixtures: one real server process per module on the tiny bundle, and encoded frames."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.service.server import ServerProcess

TOKEN = "test-token-0123456789abcdef"


def encode(image: np.ndarray, ext: str = ".jpg", quality: int = 90) -> bytes:
    """RGB array -> encoded bytes."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session")
def frames() -> list[np.ndarray]:
    """Generated endoscopy frames (RGB) at two sizes: 640x480 and 1920x1080."""
    from training.data.synth import render_image  # tests may import training; the service never does

    small = [render_image(5, i, height=480, width=640).image for i in range(3)]
    return [*small, render_image(5, 9, height=1080, width=1920).image]


@pytest.fixture(scope="module")
def server(endoarss_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(endoarss_bundle, env={"ENDOSTREAM_MAX_PIXELS": str(2000 * 2000)})
    proc.start(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()

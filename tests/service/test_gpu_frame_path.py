"""The GPU frame path through a real server: JPEG decoded by nvJPEG and resized on the GPU straight into the torch
engine, PNG on the CPU, and both agreeing with the CPU path's answer. Skips only where there is no CUDA GPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from export.onnx_export import export_onnx
from tests.service.conftest import encode
from tests.service.server import ServerProcess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gpu_server(endoarss_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    bundle = tmp_path_factory.mktemp("gpu_bundle")
    export_onnx(endoarss_ckpt, bundle, overwrite=True, torch_program=True)
    env = {"ENDOSTREAM_BACKEND": "torch", "ENDOSTREAM_DEVICE": "cuda", "ENDOSTREAM_DECODE": "cuda"}
    proc = ServerProcess(bundle, env=env)
    proc.start(tmp_path_factory.mktemp("gpu_server"))
    yield proc
    proc.stop()


def _post(server: ServerProcess, data: bytes, content_type: str) -> dict:
    reply = httpx.post(f"{server.url}/infer", content=data, headers={"content-type": content_type}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_jpeg_is_decoded_on_the_gpu_and_png_on_the_cpu(gpu_server: ServerProcess, frames) -> None:
    model = httpx.get(f"{gpu_server.url}/model").json()
    assert model["engine"]["backend"] == "torch" and model["engine"]["decoder"].startswith("cuda")
    for frame in (frames[0], frames[3]):  # 640 x 480 and 1080p
        jpeg = _post(gpu_server, encode(frame, ".jpg", quality=95), "image/jpeg")
        png = _post(gpu_server, encode(frame, ".png"), "image/png")
        assert jpeg["latency_ms"]["decoder"].startswith("cuda") and png["latency_ms"]["decoder"] == "cpu"
        assert jpeg["frame"]["width"] == frame.shape[1] and jpeg["latency_ms"]["decode"] > 0
        # the same frame through both paths: nvJPEG + GPU resize vs libjpeg (DCT-scaled) + OpenCV
        probs_gpu = jpeg["activity"]["probabilities"]
        probs_cpu = png["activity"]["probabilities"]
        assert max(abs(probs_gpu[k] - probs_cpu[k]) for k in probs_cpu) < 0.05
        assert jpeg["segmentation"]["height"] == png["segmentation"]["height"]


def test_overlays_and_bad_jpegs_on_the_gpu_path(gpu_server: ServerProcess, frames) -> None:
    data = encode(frames[0], ".jpg")
    overlay = httpx.post(
        f"{gpu_server.url}/infer", content=data, headers={"content-type": "image/jpeg", "accept": "image/png"}
    )
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    broken = httpx.post(
        f"{gpu_server.url}/infer", content=data[: len(data) // 3], headers={"content-type": "image/jpeg"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "corrupt_image"
    assert _post(gpu_server, data, "image/jpeg")["latency_ms"]["decoder"].startswith("cuda")

"""`POST /infer` against the real server process: every body type, every option, every bad input, and parity of the
served result with ONNX Runtime run directly on the same resized frame."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import cv2
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.imaging import decode_mask_rle, resize_for_model
from tests.service.conftest import encode


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming `width` x `height`, with a tiny (wrong) IDAT: enough for a header read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def _post(server, data: bytes, content_type: str = "image/jpeg", **params) -> httpx.Response:
    return httpx.post(f"{server.url}/infer", content=data, headers={"content-type": content_type}, params=params)


def test_health_ready_and_model(server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok", "detail": None}
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    model = httpx.get(f"{server.url}/model").json()
    assert model["manifest"]["tasks"][0]["name"] == "activity"
    assert model["engine"]["backend"] == "onnxruntime"
    assert model["engine"]["decoder"] == "cpu" and model["engine"]["onnxruntime_spin_wait"] is False
    assert model["ready"] is True


def test_jpeg_result_matches_onnxruntime(server, frames, endoarss_bundle) -> None:
    frame = frames[0]
    data = encode(frame, ".png")  # lossless, so the server decodes exactly `frame`
    reply = _post(server, data, "image/png")
    assert reply.status_code == 200, reply.text
    result = reply.json()
    manifest = json.loads((endoarss_bundle / "manifest.json").read_text())
    size = manifest["input"]["height"], manifest["input"]["width"]
    session = ort.InferenceSession(str(endoarss_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, seg = session.run(["activity_probs", "segmentation"], {"frames": resize_for_model(frame, *size)[None]})
    classes = manifest["tasks"][0]["classes"]
    served = np.array([result["activity"]["probabilities"][c] for c in classes])
    np.testing.assert_allclose(served, probs[0], atol=1e-5)
    assert result["activity"]["label"] == classes[int(probs[0].argmax())]
    assert result["frame"] == {
        "id": 0,
        "timestamp": None,
        "captured_at": None,
        "width": 640,
        "height": 480,
        "dropped_before": 0,
        "frame_jpeg": None,
    }
    # default: the class map at the model's grid, exactly the graph's output
    seg_result = result["segmentation"]
    grid = _png_mask(seg_result)
    assert seg_result["mask_size"] == "model" and (seg_result["height"], seg_result["width"]) == size
    np.testing.assert_array_equal(grid, seg[0])
    # mask_size=frame: the same map upscaled by the documented rule (nearest, at pixel centres)
    full = _post(server, data, "image/png", mask_size="frame").json()["segmentation"]
    mask = _png_mask(full)
    assert full["mask_size"] == "frame" and (full["height"], full["width"]) == (480, 640)
    expected = cv2.resize(seg[0], (640, 480), interpolation=cv2.INTER_NEAREST_EXACT)
    assert (mask == expected).mean() == 1.0
    assert full["classes"] == seg_result["classes"]  # fractions are shares of the frame either way
    fractions = {c["index"]: c["fraction"] for c in seg_result["classes"]}
    for index, fraction in fractions.items():
        assert fraction == pytest.approx((mask == index).mean(), abs=1e-6)
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-4)
    latency = result["latency_ms"]
    stages = ["decode", "preprocess", "queue", "infer", "postprocess", "encode", "unattributed"]
    assert all(latency[s] >= 0 for s in stages) and latency["infer"] > 0
    assert sum(latency[s] for s in stages) == pytest.approx(latency["total"], abs=0.01)
    assert latency["decoder"] == "cpu"
    assert result["model"]["backend"] == "onnxruntime" and result["model"]["precision"] == "fp32"


def _png_mask(segmentation: dict) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(segmentation["mask"]), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("mask_size", ["model", "frame"])
def test_compact_response_carries_the_raw_mask(server, frames, mask_size) -> None:
    from service.postprocess import RAW_MEDIA_TYPE, decode_compact

    data = encode(frames[2], ".png")
    reply = _post(server, data, "image/png", mask="raw", mask_size=mask_size)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == RAW_MEDIA_TYPE
    result, mask = decode_compact(reply.content)
    seg = result["segmentation"]
    assert seg["mask_format"] == "raw" and seg["mask"] is None and mask.dtype == np.uint8
    png = _post(server, data, "image/png", mask_size=mask_size).json()
    np.testing.assert_array_equal(mask, _png_mask(png["segmentation"]))
    assert result["activity"]["probabilities"] == pytest.approx(png["activity"]["probabilities"], abs=1e-6)
    # the README's client example, verbatim in spirit: length, JSON, then height x width bytes
    n = int.from_bytes(reply.content[:4], "little")
    meta = json.loads(reply.content[4 : 4 + n])
    assert len(reply.content) == 4 + n + meta["segmentation"]["height"] * meta["segmentation"]["width"]


def test_raw_mask_is_refused_where_it_cannot_travel(server, frames) -> None:
    files = [("frame", ("f.jpg", encode(frames[0]), "image/jpeg"))]
    reply = httpx.post(f"{server.url}/infer", files=files, params={"mask": "raw"}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "mask"


@pytest.mark.parametrize("ext,content_type", [(".jpg", "image/jpeg"), (".png", "image/png"), (".bmp", "image/bmp")])
def test_image_formats(server, frames, ext, content_type) -> None:
    reply = _post(server, encode(frames[1], ext), content_type)
    assert reply.status_code == 200, reply.text
    assert reply.json()["frame"]["width"] == 640


def test_rle_mask_equals_png_mask_and_tasks_filter(server, frames) -> None:
    data = encode(frames[2], ".png")
    png = _post(server, data, "image/png").json()["segmentation"]
    rle = _post(server, data, "image/png", mask="rle").json()["segmentation"]
    assert rle["mask_format"] == "rle"
    from_png = _png_mask(png)
    only_activity = _post(server, data, "image/png", tasks="activity").json()
    assert only_activity["segmentation"] is None and only_activity["activity"] is not None
    np.testing.assert_array_equal(decode_mask_rle(rle["mask"], rle["height"], rle["width"]), from_png)
    full = _post(server, data, "image/png", mask="rle", mask_size="frame").json()["segmentation"]
    assert decode_mask_rle(full["mask"], 480, 640).shape == (480, 640)
    no_mask = _post(server, data, "image/png", mask="none").json()["segmentation"]
    assert no_mask["mask"] is None and no_mask["classes"] == png["classes"]


def test_multipart_batch_in_order(server, frames) -> None:
    files = [("frame", (f"f{i}.jpg", encode(f), "image/jpeg")) for i, f in enumerate(frames[:3])]
    files.append(("frame", ("big.jpg", encode(frames[3]), "image/jpeg")))
    reply = httpx.post(f"{server.url}/infer", files=files, timeout=30)
    assert reply.status_code == 200, reply.text
    results = reply.json()
    assert [r["frame"]["id"] for r in results] == [0, 1, 2, 3]
    assert [r["frame"]["width"] for r in results] == [640, 640, 640, 1920]
    single = [_post(server, encode(f)).json()["activity"]["probabilities"] for f in frames[:3]]
    for batched, alone in zip(results, single, strict=False):
        for label, p in alone.items():
            assert batched["activity"]["probabilities"][label] == pytest.approx(p, abs=1e-4)


def test_overlay_png(server, frames) -> None:
    data = encode(frames[0], ".png")
    reply = httpx.post(
        f"{server.url}/infer", content=data, headers={"content-type": "image/png", "accept": "image/png"}
    )
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert (
        reply.headers["x-activity"]
        in json.loads(httpx.get(f"{server.url}/model").text)["manifest"]["tasks"][0]["classes"]
    )
    overlay = cv2.cvtColor(cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert overlay.shape == frames[0].shape
    changed = np.abs(overlay.astype(int) - frames[0].astype(int)).sum(-1) > 0
    assert changed.mean() > 0.01  # tint and label banner drawn
    via_query = _post(server, data, "image/png", overlay="1")
    assert via_query.headers["content-type"] == "image/png"


BAD_INPUTS = [
    ("empty", b"", "image/jpeg", 400, "empty_body"),
    ("not an image", b"hello, this is text" * 10, "image/jpeg", 400, "not_an_image"),
    ("huge dimensions", _png_header_only(30000, 30000), "image/png", 400, "too_many_pixels"),
    ("wrong content type", b"abc", "text/plain", 415, "unsupported_media_type"),
    ("malformed json", b"{source: nope", "application/json", 400, "invalid_json"),
    ("json without source", b'{"max_frames": 3}', "application/json", 400, "invalid_json"),
]


@pytest.mark.parametrize("name,data,content_type,status,code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx_and_the_next_request_works(server, frames, name, data, content_type, status, code):
    reply = _post(server, data, content_type)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    assert _post(server, encode(frames[0])).status_code == 200


def test_truncated_and_corrupt_jpeg(server, frames) -> None:
    good = encode(frames[0])
    for broken in (good[: len(good) // 2], good[:200] + bytes(len(good) - 200)):
        reply = _post(server, broken)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "corrupt_image"
    assert _post(server, good).status_code == 200


def test_bad_query_and_unknown_task(server, frames) -> None:
    reply = _post(server, encode(frames[0]), mask="gif")
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "mask"
    reply = _post(server, encode(frames[0]), tasks="depth")
    assert reply.status_code == 400 and "depth" in reply.json()["error"]["message"]


def test_openapi_documents_every_route_with_examples(server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    paths = spec["paths"]
    for route in ("/infer", "/healthz", "/readyz", "/model", "/metrics", "/streams", "/streams/{stream_id}"):
        assert route in paths, route
    body = paths["/infer"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "image/png", "multipart/form-data", "application/json"} <= set(body)
    assert body["application/json"]["examples"]
    assert spec["components"]["schemas"]["InferResult"]["examples"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_request_id_echoed(server) -> None:
    reply = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "abc-123"})
    assert reply.headers["x-request-id"] == "abc-123"
    assert len(httpx.get(f"{server.url}/healthz").headers["x-request-id"]) == 32


def test_metrics_after_traffic(server, frames) -> None:
    from tests.service.metrics_text import scrape, value

    before = scrape(server.url)
    for _ in range(3):
        assert _post(server, encode(frames[0])).status_code == 200
    assert _post(server, b"junk", "image/jpeg").status_code == 400
    after = scrape(server.url)
    route = {"route": "/infer", "method": "POST"}
    grew = value(after, "endostream_http_request_duration_seconds_count", status_class="2xx", **route) - value(
        before, "endostream_http_request_duration_seconds_count", status_class="2xx", **route
    )
    assert grew == 3
    assert value(after, "endostream_http_request_duration_seconds_count", status_class="4xx", **route) >= 1
    for stage in ("decode", "preprocess", "queue", "infer", "postprocess", "encode"):
        assert value(after, "endostream_stage_duration_seconds_count", stage=stage) >= 3, stage
    buckets = {lab["le"] for name, lab, _ in after["endostream_stage_duration_seconds"] if name.endswith("_bucket")}
    assert {"0.0167", "0.0333", "0.0667"} <= buckets  # exact frame-period boundaries
    processed = value(after, "endostream_frames_total", outcome="processed", source="http")
    assert processed - value(before, "endostream_frames_total", outcome="processed", source="http") == 3
    assert value(after, "endostream_frames_total", outcome="failed", source="http") >= 1
    assert value(after, "endostream_rejected_total", reason="bad_input") >= 1
    assert value(after, "endostream_batch_size_count") >= 3
    assert value(after, "endostream_frame_latency_seconds_count", source="http") >= 3
    assert value(after, "endostream_ready") == 1
    assert value(after, "endostream_queue_depth") == 0
    assert value(after, "endostream_http_requests_in_flight") == 1  # the scrape itself
    info = after["endostream_model_info"][0][1]
    assert info["backend"] == "onnxruntime" and info["family"] == "endoarss" and len(info["version"]) == 12

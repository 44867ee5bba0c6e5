"""Security and overload on the real server: bearer token, upload limit (declared and chunked), queue full -> 503."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from export.onnx_export import export_onnx
from tests.service.conftest import TOKEN, encode
from tests.service.server import ServerProcess

UPLOAD_LIMIT = 300_000
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def slow_bundle(endoarss_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model at 224 x 224: slow enough per frame on CPU that a burst fills a one-frame queue."""
    out = tmp_path_factory.mktemp("slow-bundle")
    export_onnx(endoarss_ckpt, out, height=224, width=224, overwrite=True)
    return out


@pytest.fixture(scope="module")
def guarded(slow_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "ENDOSTREAM_API_TOKEN": TOKEN,
        "ENDOSTREAM_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "ENDOSTREAM_QUEUE_LIMIT": "1",
        "ENDOSTREAM_MAX_BATCH": "1",
        "ENDOSTREAM_MAX_CONCURRENT_REQUESTS": "64",  # the burst below must reach the engine queue's own limit
    }
    proc = ServerProcess(slow_bundle, env=env).start(tmp_path_factory.mktemp("guarded"))
    yield proc
    proc.stop()


def test_token_required_except_probes_and_metrics(guarded, frames) -> None:
    data = encode(frames[0])
    for method, path in [("POST", "/infer"), ("GET", "/model"), ("GET", "/streams"), ("DELETE", "/streams/x")]:
        reply = httpx.request(method, f"{guarded.url}{path}", content=data if method == "POST" else None)
        assert reply.status_code == 401, (path, reply.text)
        assert reply.json()["error"]["code"] == "unauthorized"
        wrong = httpx.request(method, f"{guarded.url}{path}", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{guarded.url}{path}").status_code == 200, path
    ok = httpx.post(f"{guarded.url}/infer", content=data, headers={**AUTH, "content-type": "image/jpeg"}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{guarded.url}/model", headers=AUTH).status_code == 200


def test_upload_limit_declared_and_chunked(guarded, frames) -> None:
    big = encode(frames[3], ".png")
    assert len(big) > UPLOAD_LIMIT
    headers = {**AUTH, "content-type": "image/png"}
    reply = httpx.post(f"{guarded.url}/infer", content=big, headers=headers)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    reply = httpx.post(f"{guarded.url}/infer", content=chunks(), headers=headers)
    assert reply.status_code == 413, reply.text
    small = encode(frames[0])
    assert httpx.post(f"{guarded.url}/infer", content=small, headers={**AUTH, "content-type": "image/jpeg"}).is_success


def test_queue_full_answers_503_with_retry_after_at_once(guarded, frames) -> None:
    data = encode(frames[0])
    headers = {**AUTH, "content-type": "image/jpeg"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{guarded.url}/infer", content=data, headers=headers) for _ in range(24))
            )

    replies = asyncio.run(burst())
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    refused = next(r for r in replies if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert "ENDOSTREAM_QUEUE_LIMIT" in refused.json()["error"]["message"]
    assert httpx.post(f"{guarded.url}/infer", content=data, headers=headers, timeout=30).status_code == 200


def test_websocket_needs_the_token(guarded, frames) -> None:
    url = guarded.url.replace("http://", "ws://") + "/ws/infer"

    async def refused() -> int | None:
        try:
            async with websockets.connect(url) as ws:
                await ws.recv()
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        except websockets.InvalidStatus as err:
            return err.response.status_code
        return None

    async def accepted() -> dict:
        async with websockets.connect(f"{url}?token={TOKEN}") as ws:
            await ws.send(encode(frames[0]))
            return json.loads(await ws.recv())

    assert asyncio.run(refused()) in (1008, 403)
    assert asyncio.run(accepted())["activity"]["label"]


@pytest.fixture(scope="module")
def strict(endoarss_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "ENDOSTREAM_MAX_UPLOAD_BYTES": "600000",
        "ENDOSTREAM_BODY_READ_TIMEOUT_S": "1",
        "ENDOSTREAM_MAX_INFLIGHT_BODY_BYTES": "1000000",
    }
    proc = ServerProcess(endoarss_bundle, env=env).start(tmp_path_factory.mktemp("strict"))
    yield proc
    proc.stop()


def _slow_upload(server: ServerProcess, declared: int, sent: bytes) -> socket.socket:
    """A connection that declares `declared` body bytes and sends only `sent`, then waits."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + sent)
    return sock


def _status(sock: socket.socket) -> tuple[int, str]:
    """The status and the whole response (head and its Content-Length of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    reply = (head + b"\r\n\r\n" + body).decode(errors="replace")
    return int(reply.split(" ", 2)[1]), reply


def test_a_body_that_never_arrives_gets_408(strict) -> None:
    started = time.monotonic()
    sock = _slow_upload(strict, 1000, b"x" * 10)
    status, reply = _status(sock)
    sock.close()
    assert status == 408 and "ENDOSTREAM_BODY_READ_TIMEOUT_S" in reply
    assert time.monotonic() - started < 5


def test_bodies_in_flight_are_bounded_across_requests(strict, frames) -> None:
    holders = [_slow_upload(strict, 500_000, b"x" * 1000) for _ in range(2)]  # reserve 1,000,000 bytes together
    time.sleep(0.2)
    started = time.monotonic()
    refused = httpx.post(f"{strict.url}/infer", content=b"y" * 200_000, headers={"content-type": "image/jpeg"})
    assert refused.status_code == 503 and time.monotonic() - started < 0.5
    assert refused.headers["retry-after"] == "1"
    assert "ENDOSTREAM_MAX_INFLIGHT_BODY_BYTES" in refused.json()["error"]["message"]
    assert [_status(sock)[0] for sock in holders] == [408, 408]  # the slow ones time out and give their share back
    for sock in holders:
        sock.close()
    data = encode(frames[0])
    assert httpx.post(f"{strict.url}/infer", content=data, headers={"content-type": "image/jpeg"}).status_code == 200

"""Hostile frames against a real server: no 5xx and no broken keep-alive connection, over raw bodies, multipart
batches and the WebSocket. `ENDOSTREAM_HOSTILE_MUTATIONS` scales the random part of the corpus (CI: a few hundred;
the closing figure of 10,000+ requests came from the same test with a larger value)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.reliability.hostile_corpus import _encode, mutated, structured
from tests.service.server import ServerProcess

MUTATIONS = int(os.environ.get("ENDOSTREAM_HOSTILE_MUTATIONS", "400"))
GOOD_EVERY = 20  # a good frame on the same connection after this many hostile ones
ALLOWED = {200, 400, 413}  # a mutation that still decodes is a frame like any other


@pytest.fixture(scope="module")
def valid() -> dict[str, bytes]:
    from training.data.synth import render_image  # tests may import training; the service never does

    image = render_image(5, 0, height=480, width=640).image
    return {"JPEG": _encode(image, "JPEG", quality=90), "PNG": _encode(image, "PNG"), "BMP": _encode(image, "BMP")}


@pytest.fixture(scope="module")
def server(endoarss_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(endoarss_bundle, env={"ENDOSTREAM_MAX_UPLOAD_BYTES": str(8 << 20)})
    proc.start(tmp_path_factory.mktemp("hostile-server"))
    yield proc
    proc.stop()


def _post(conn: http.client.HTTPConnection, body: bytes, content_type: str) -> tuple[int, bytes, str | None]:
    conn.request("POST", "/infer", body=body, headers={"Content-Type": content_type})
    reply = conn.getresponse()
    return reply.status, reply.read(), reply.getheader("connection")


def test_raw_bodies_never_5xx_and_keep_the_connection(server: ServerProcess, valid: dict[str, bytes]) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    corpus = [*structured(valid), *mutated(valid, MUTATIONS)]
    types = ("image/jpeg", "image/png", "image/bmp")
    statuses: Counter[int] = Counter()
    failures = []
    for i, (name, body) in enumerate(corpus):
        status, payload, connection = _post(conn, body, types[i % 3])
        statuses[status] += 1
        if status not in ALLOWED or connection == "close":
            failures.append((name, status, payload[:200]))
        if status == 400:
            error = json.loads(payload)["error"]
            assert error["code"] and error["message"], name
        if i % GOOD_EVERY == GOOD_EVERY - 1:  # the same connection still serves a good frame
            status, payload, _ = _post(conn, valid["JPEG"], "image/jpeg")
            assert status == 200, (name, payload[:200])
    conn.close()
    print(f"{len(corpus)} hostile requests: {dict(statuses)}")
    assert not failures, failures[:10]
    assert statuses[400] > len(corpus) // 2  # most of the corpus is refused, not silently served


def test_a_bad_part_fails_its_batch_with_a_400_naming_it(server: ServerProcess, valid: dict[str, bytes]) -> None:
    bad = dict(structured(valid))
    for name in ("BMP compression 4", "PNG zTXt bomb", "JPEG truncated to 1.00%", "WEBP body"):
        parts = [("frame", (f"f{i}", valid["JPEG"], "image/jpeg")) for i in range(3)]
        parts.insert(1, ("frame", ("bad", bad[name], "image/jpeg")))
        reply = httpx.post(f"{server.url}/infer", files=parts, timeout=30)
        assert reply.status_code == 400, (name, reply.text)
        assert reply.json()["error"]["param"] == "frame[1]", name
    good = [("frame", (f"f{i}", valid["JPEG"], "image/jpeg")) for i in range(3)]
    assert httpx.post(f"{server.url}/infer", files=good, timeout=30).status_code == 200


def test_websocket_answers_every_hostile_frame_and_goes_on(server: ServerProcess, valid: dict[str, bytes]) -> None:
    corpus = [body for _, body in structured(valid)][:60]

    async def session() -> tuple[list[dict], dict]:
        async with websockets.connect(server.url.replace("http://", "ws://") + "/ws/infer", max_size=None) as ws:
            answers = []
            for body in corpus:  # one at a time, so none is dropped as stale
                await ws.send(body)
                answers.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            await ws.send(valid["JPEG"])
            return answers, json.loads(await asyncio.wait_for(ws.recv(), 30))

    answers, last = asyncio.run(session())
    assert len(answers) == len(corpus)
    errors = [a for a in answers if "error" in a]
    assert errors and all(a["error"]["code"] in {"corrupt_image", "not_an_image", "too_many_pixels",
                                                 "empty_body", "bad_size"} for a in errors)  # fmt: skip
    assert "activity" in last and last["frame"]["id"] == len(corpus)

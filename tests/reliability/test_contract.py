"""The API contract with a token set, and what reaches the log: docs and schema need the token (the viewer page and
its assets do not: a browser cannot send a header when it navigates, and they hold no data); a 401 says
`WWW-Authenticate: Bearer`; Starlette's own errors use the error shape; a bad `/ws/infer` query is an invalid
parameter, not an auth failure; the token never appears in a log line; a client that hangs up mid-upload is not a
server error (no traceback, no 5xx sample)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.reliability import START_S
from tests.service.conftest import TOKEN, encode
from tests.service.metrics_text import scrape, value
from tests.service.server import ServerProcess

WRONG_TOKEN = "wrong-token-9876543210fedcba"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def service(endoarss_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"ENDOSTREAM_API_TOKEN": TOKEN, "ENDOSTREAM_LOG_LEVEL": "debug"}
    proc = ServerProcess(endoarss_bundle, env=env).start(tmp_path_factory.mktemp("contract"), timeout=START_S)
    yield proc
    proc.stop()


def _ws(service: ServerProcess, query: str) -> str:
    return service.url.replace("http://", "ws://") + "/ws/infer" + query


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/model", "/streams"])
def test_protected_routes_need_the_token_and_say_bearer(service: ServerProcess, path: str) -> None:
    refused = httpx.get(service.url + path)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert refused.json()["error"]["code"] == "unauthorized"
    assert httpx.get(service.url + path, headers=AUTH).status_code == 200


def test_schema_with_the_token_is_the_api(service: ServerProcess) -> None:
    schema = httpx.get(f"{service.url}/openapi.json", headers=AUTH).json()
    assert "/infer" in schema["paths"] and "/openapi.json" not in schema["paths"]


@pytest.mark.parametrize("path", ["/", "/static/viewer.js", "/healthz", "/readyz", "/metrics"])
def test_open_routes_stay_open(service: ServerProcess, path: str) -> None:
    assert httpx.get(service.url + path).status_code == 200


def test_starlette_errors_use_the_error_shape(service: ServerProcess) -> None:
    no_boundary = httpx.post(
        f"{service.url}/infer",
        content=b"--x\r\n\r\nnot a form",
        headers={**AUTH, "content-type": "multipart/form-data"},
    )
    assert no_boundary.status_code == 400
    assert no_boundary.json()["error"]["code"] == "bad_request" and "boundary" in no_boundary.json()["error"]["message"]
    unknown = httpx.get(f"{service.url}/no-such-route", headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    wrong_method = httpx.put(f"{service.url}/infer", headers=AUTH)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_bad_websocket_query_is_an_invalid_parameter(service: ServerProcess) -> None:
    with connect(_ws(service, f"?token={TOKEN}&mask=bogus")) as ws:
        error = json.loads(ws.recv(timeout=5))["error"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert error["code"] == "invalid_parameter" and error["param"] == "mask", error
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with pytest.raises(InvalidStatus) as refused:  # without a valid token it is still refused before the handshake
        connect(_ws(service, f"?token={WRONG_TOKEN}&mask=bogus")).close()
    assert refused.value.response.status_code == 403


def test_no_token_in_any_log_line(service: ServerProcess) -> None:
    frame = encode(np.full((96, 128, 3), 90, np.uint8))
    with connect(_ws(service, f"?token={TOKEN}&mask=none")) as ws:
        ws.send(frame)
        assert "activity" in json.loads(ws.recv(timeout=10))
    with pytest.raises(InvalidStatus):
        connect(_ws(service, f"?token={WRONG_TOKEN}")).close()
    httpx.get(f"{service.url}/model?token={TOKEN}")
    time.sleep(0.3)  # let the server write its lines
    log = service.log()
    assert "/ws/infer?token=***" in log, "the handshake lines were not logged: this test would prove nothing"
    leaks = [line for line in log.splitlines() if TOKEN in line or WRONG_TOKEN in line]
    assert not leaks, leaks


def test_client_hanging_up_mid_upload_is_not_a_server_error(service: ServerProcess) -> None:
    before = scrape(service.url)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            head = (
                f"POST /infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
            )
            sock.sendall(head.encode() + b"\xff\xd8" + b"\0" * 1000)
            time.sleep(0.2)  # the route is reading the body when the client goes
    time.sleep(0.5)
    after = scrape(service.url)
    errors = value(after, "endostream_http_request_duration_seconds_count", route="/infer", status_class="5xx")
    errors -= value(before, "endostream_http_request_duration_seconds_count", route="/infer", status_class="5xx")
    hung_up = value(after, "endostream_http_request_duration_seconds_count", route="/infer", status_class="4xx")
    hung_up -= value(before, "endostream_http_request_duration_seconds_count", route="/infer", status_class="4xx")
    log = service.log()
    assert errors == 0, f"{errors} disconnects counted as 5xx"
    assert hung_up == 3, "the disconnects were not recorded as client-side (499)"
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]

"""The viewer page at `/`, in real headless Chromium (Playwright driving Debian's /usr/bin/chromium) against the real
server process: an uploaded frame is drawn with its mask overlay, checked pixel by pixel against the served mask; a
`file:` stream is followed, stopped and ended; error bodies and the token field reach the user."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.service.conftest import TOKEN, encode
from tests.service.server import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; CI installs it. `playwright install` is never run.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ALPHA = 0.45  # the page's overlay opacity (viewer.js OVERLAY_ALPHA)
WAIT_MS = 15_000
CLIP_FPS = 10.0
CLIP_FRAMES = 100  # 10 s at the native rate the file reader paces to: still running when the test stops it

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # the 640 px frame fits unscaled
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
def clip(frames: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MP4 (mp4v) of the generated 640x480 frames, in a folder of its own for the stream allowlist."""
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (width, height))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(CLIP_FRAMES):
        writer.write(cv2.cvtColor(frames[i % 3], cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def stream_server(
    endoarss_bundle: Path, clip: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server that may read files next to `clip`, and that wants the API token."""
    env = {"ENDOSTREAM_STREAM_ALLOWLIST": f"file:{clip.parent}/", "ENDOSTREAM_API_TOKEN": TOKEN}
    proc = ServerProcess(endoarss_bundle, env=env)
    proc.start(tmp_path_factory.mktemp("stream-server"))
    yield proc
    proc.stop()


def _open(page: Page, server: ServerProcess) -> None:
    page.goto(f"{server.url}/")
    expect(page.locator("#ready")).to_have_attribute("data-state", "ready", timeout=WAIT_MS)


def _rgb(encoded: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _infer(server: ServerProcess, jpeg: bytes) -> dict:
    reply = httpx.post(
        f"{server.url}/infer", params={"mask": "png"}, content=jpeg, headers={"content-type": "image/jpeg"}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def _mask(result: dict) -> np.ndarray:
    png = base64.b64decode(result["segmentation"]["mask"])
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def _colours(server: ServerProcess) -> np.ndarray:
    tasks = httpx.get(f"{server.url}/model").json()["manifest"]["tasks"]
    return np.array(next(t for t in tasks if t["kind"] == "segmentation")["colors"], np.float32)


def _frame_mask(grid: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """The model-grid mask at the frame's size, by the rule the API documents (what `mask_size=frame` returns)."""
    return cv2.resize(grid, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def _check_overlay(shot: np.ndarray, raw: np.ndarray, grid: np.ndarray, colours: np.ndarray) -> None:
    """`shot` is `raw` with the model-grid mask `grid`, scaled onto it by the documented rule (nearest sample at
    pixel centres), drawn in `colours` at ALPHA, class 0 left clear (JPEG decoders may differ by 1-2)."""
    assert shot.shape == raw.shape, "the canvas should show the frame at its own size"
    assert grid.shape != raw.shape[:2], "the served mask should be at the model's grid"
    mask = _frame_mask(grid, raw)
    assert shot.std() > 10, "the canvas is blank"
    expected = np.where((mask > 0)[..., None], raw * (1 - ALPHA) + colours[mask] * ALPHA, raw)
    tinted_expected = np.abs(expected - raw).max(-1) > 16
    tinted_shown = np.abs(shot - raw).max(-1) > 16
    assert tinted_expected.mean() > 0.2, "the mask should cover a meaningful share of this frame"
    assert (tinted_shown == tinted_expected).mean() > 0.97, "the tinted pixels are not where the mask is"
    assert (np.abs(shot - expected).max(-1) <= 12).mean() > 0.97, "the overlay does not match frame + mask colours"
    for index in np.unique(mask):
        where = mask == index
        if index == 0 or where.mean() < 0.02:
            continue
        # undo the blend: each class shows in its own manifest colour
        recovered = ((shot[where] - raw[where] * (1 - ALPHA)) / ALPHA).mean(0)
        np.testing.assert_allclose(recovered, colours[index], atol=10, err_msg=f"class {index} colour")
    # crisp edges: every tinted pixel shows one class's colour, none a blend of two neighbouring classes
    tinted = np.abs(shot - raw).max(-1) > 16
    recovered = (shot[tinted] - raw[tinted] * (1 - ALPHA)) / ALPHA
    nearest = np.abs(recovered[:, None, :] - colours[None, 1:, :]).max(-1).min(-1)
    assert (nearest <= 30).mean() > 0.995, "the scaled mask was smoothed: edge pixels mix class colours"


def test_upload_draws_frame_mask_overlay_and_readouts(server, page: Page, frames, tmp_path: Path) -> None:
    jpeg = encode(frames[0])
    (tmp_path / "frame.jpg").write_bytes(jpeg)
    result = _infer(server, jpeg)
    model = httpx.get(f"{server.url}/model").json()

    _open(page, server)
    expect(page.locator("#model-name")).to_have_text(model["manifest"]["name"])
    expect(page.locator("#model-version")).to_have_text(model["version"])
    expect(page.locator("#model-backend")).to_contain_text(model["engine"]["backend"])
    expect(page.locator("#assistive-note")).to_contain_text("Assistive only")

    page.set_input_files("#files", str(tmp_path / "frame.jpg"))
    activity = result["activity"]
    expect(page.locator("#activity-label")).to_have_text(activity["label"], timeout=WAIT_MS)
    canvas = page.locator("#view")
    expect(canvas).to_have_attribute("data-frames", "1")
    expect(page.locator("#activity-confidence")).to_have_text(f"{100 * activity['confidence']:.1f} %")
    assert page.locator("#activity").get_attribute("aria-live") == "polite"
    assert activity["label"] in (canvas.get_attribute("aria-label") or "")
    expect(page.locator("#probabilities li")).to_have_count(len(activity["probabilities"]))
    expect(page.locator("#activity-temporal")).to_be_hidden()  # this bundle has no temporal head
    for present in result["segmentation"]["classes"]:
        expect(page.locator("#classes")).to_contain_text(present["name"])
    expect(page.locator("#latency-total")).to_have_text(re.compile(r"^\d+\.\d$"))
    expect(page.locator("#latency-p50")).to_have_text(re.compile(r"^\d+\.\d$"))
    expect(page.locator("#latency-stages tr")).to_have_count(9)  # six stages + unattributed + batch size + decoder

    shot_path = tmp_path / "viewer-canvas.png"
    shot = _rgb(canvas.screenshot(path=str(shot_path))).astype(np.float32)
    print(f"viewer canvas screenshot: {shot_path}")
    _check_overlay(shot, _rgb(jpeg).astype(np.float32), _mask(result), _colours(server))


def test_background_class_is_left_clear(server, page: Page, frames, tmp_path: Path) -> None:
    # The tiny untrained test model never predicts class 0, so the served reply gets a mask whose left half is
    # background before the page sees it; everything else about the reply is the server's.
    jpeg = encode(frames[1])
    result = _infer(server, jpeg)
    mask = _mask(result)
    mask[:, : mask.shape[1] // 2] = 0
    result["segmentation"]["mask"] = base64.b64encode(cv2.imencode(".png", mask)[1].tobytes()).decode()
    page.route("**/infer?*", lambda route: route.fulfill(json=result))

    _open(page, server)
    page.set_input_files("#files", files=[{"name": "frame.jpg", "mimeType": "image/jpeg", "buffer": jpeg}])
    canvas = page.locator("#view")
    expect(canvas).to_have_attribute("data-frames", "1", timeout=WAIT_MS)
    shot = _rgb(canvas.screenshot(path=str(tmp_path / "viewer-background.png"))).astype(np.float32)
    raw = _rgb(jpeg).astype(np.float32)
    _check_overlay(shot, raw, mask, _colours(server))
    background = _frame_mask(mask, raw) == 0
    assert np.abs(shot - raw)[background].max() <= 12, "background pixels must show the frame untouched"


@pytest.fixture(scope="module")
def temporal_server(temporal_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(temporal_bundle)
    proc.start(tmp_path_factory.mktemp("temporal-server"))
    yield proc
    proc.stop()


def test_temporal_answer_is_shown_beside_the_frame_answer(temporal_server, page: Page, frames, tmp_path: Path) -> None:
    jpegs = [encode(f) for f in frames[:2]]
    for i, jpeg in enumerate(jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg)
    first = _infer(temporal_server, jpegs[0])  # no session: the per-frame answer only
    _open(page, temporal_server)
    page.set_input_files("#files", str(tmp_path / "0.jpg"))
    expect(page.locator("#view")).to_have_attribute("data-frames", "1", timeout=WAIT_MS)
    # the page's uploads are one session: its first frame starts a fresh state, whose EMA is the frame's answer
    expect(page.locator("#activity-temporal")).to_be_visible()
    expect(page.locator("#activity-label")).to_have_text(first["activity"]["label"])
    expect(page.locator("#temporal-label")).to_have_text(first["activity"]["label"])
    expect(page.locator("#temporal-confidence")).to_have_text(f"{100 * first['activity']['confidence']:.1f} %")
    expect(page.locator("#temporal-context")).to_have_text("1 step · 0.1 s of context (ema)")
    assert "over time" in (page.locator("#view").get_attribute("aria-label") or "")
    assert page.locator("#activity-temporal").get_attribute("aria-live") == "polite"
    page.wait_for_timeout(300)  # > one 0.1 s step: the next upload advances the session
    page.set_input_files("#files", str(tmp_path / "1.jpg"))
    expect(page.locator("#view")).to_have_attribute("data-frames", "2", timeout=WAIT_MS)
    expect(page.locator("#temporal-context")).to_have_text(re.compile(r"^[2-8] steps · \d\.\d s of context \(ema\)$"))


def test_error_body_is_shown(server, page: Page) -> None:
    broken = b"this is not an image"
    reply = httpx.post(f"{server.url}/infer", content=broken, headers={"content-type": "image/jpeg"})
    assert reply.status_code == 400
    _open(page, server)
    page.set_input_files("#files", files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": broken}])
    expect(page.locator("#error")).to_contain_text(reply.json()["error"]["message"], timeout=WAIT_MS)
    expect(page.locator("#error")).to_contain_text("broken.jpg")
    expect(page.locator("#upload-status")).to_have_text("0 of 1 frame processed.")


def _streams(server: ServerProcess) -> list[dict]:
    return httpx.get(f"{server.url}/streams", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def test_stream_with_token_renders_frames_then_stops(stream_server, clip: Path, page: Page) -> None:
    _open(page, stream_server)
    expect(page.locator("#error")).to_contain_text("API token", timeout=WAIT_MS)  # /model answered 401
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    expect(page.locator("#model-name")).to_have_text("tiny", timeout=WAIT_MS)
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('endostream.token')") == TOKEN

    page.fill("#source", f"file:{clip}")
    page.click("#start")
    page.wait_for_function("+document.querySelector('#stream-frames').textContent >= 3", timeout=WAIT_MS)
    expect(page.locator("#stream-fps")).to_have_text(re.compile(r"^\d+\.\d$"))
    assert float(page.inner_text("#stream-fps")) > 1
    assert int(page.get_attribute("#view", "data-frames") or 0) >= 1  # latest wins: some frames may be skipped
    expect(page.locator("#activity-label")).not_to_have_text("–")
    expect(page.locator("#stream-status")).to_contain_text("Streaming")
    assert len(_streams(stream_server)) == 1

    page.click("#stop")
    expect(page.locator("#stream-status")).to_have_text(re.compile(r"^Stopped after \d+ frames?\.$"))
    expect(page.locator("#start")).to_be_enabled()
    deadline = time.monotonic() + 5
    while _streams(stream_server) and time.monotonic() < deadline:  # the server noticed the disconnect
        time.sleep(0.1)
    assert _streams(stream_server) == []

    # the end line: a run limited by max_seconds finishes by itself
    page.fill("#max-seconds", "0.5")
    page.click("#start")
    expect(page.locator("#stream-status")).to_have_text(re.compile(r"^Ended \(max_seconds\) after \d+ frames?\.$"))

    # a source outside the allowlist: the 403 body's message is shown
    page.fill("#source", "file:/etc/hostname")
    page.click("#start")
    expect(page.locator("#error")).to_contain_text("allowlist", timeout=WAIT_MS)
    expect(page.locator("#stream-status")).to_contain_text("Failed:")

"""Bundles that cannot serve fail fast: `endostream serve` exits non-zero within 30 s with one line naming the
problem (a liveness probe must not keep a process that will never be ready), and in-process `/healthz` turns 503
once the engine has failed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from service.bundle import sha256_file
from service.launcher import free_port, stop_process

EXIT_WITHIN_S = 30.0  # from the process's start
PARALLEL = 2
ENV = {**os.environ, "ENDOSTREAM_THREADS": "1"}


def _edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def garbage_graph(bundle: Path) -> None:
    """Random bytes as model.onnx, with the hash re-recorded so the integrity check passes."""
    (bundle / "model.onnx").write_bytes(os.urandom(4096))
    _edit_manifest(bundle, lambda m: m.update(model_sha256=sha256_file(bundle / "model.onnx")))


def negative_input(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["input"].update(height=-m["input"]["height"]))


def graph_outside_the_bundle(bundle: Path) -> None:
    outside = bundle.parent / "elsewhere"
    outside.mkdir()
    shutil.move(bundle / "model.onnx", outside / "model.onnx")
    _edit_manifest(bundle, lambda m: m.update(model_file="../elsewhere/model.onnx"))


def absolute_graph_path(bundle: Path) -> None:
    outside = bundle.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")
    _edit_manifest(bundle, lambda m: m.update(model_file=str((outside / "model.onnx").resolve())))


def output_the_graph_lacks(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["tasks"][0].update(output="activity_probabilities"))


CASES = {  # how the bundle is broken -> a phrase its one error line must carry
    "garbage_graph": (garbage_graph, "the engine failed to start"),
    "negative_input": (negative_input, "input.height"),
    "graph_outside_the_bundle": (graph_outside_the_bundle, "points outside the bundle folder"),
    "absolute_graph_path": (absolute_graph_path, "points outside the bundle folder"),
    "output_the_graph_lacks": (output_the_graph_lacks, "that the graph lacks"),
}


def _spawn(case: str, endoarss_bundle: Path, folder: Path) -> tuple[subprocess.Popen[bytes], Path, int, float]:
    breaker, _ = CASES[case]
    bundle = folder / case / "bundle"
    shutil.copytree(endoarss_bundle, bundle)
    breaker(bundle)
    port, log = free_port(), folder / case / "serve.log"
    cmd = [sys.executable, "-m", "endostream", "serve", "--bundle", str(bundle), "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    return proc, log, port, time.monotonic()


def test_bad_bundles_exit_non_zero_with_one_clear_line(endoarss_bundle: Path, tmp_path: Path) -> None:
    """Two processes at a time (one per core): the suite pays about half the start-up time of five in a row."""
    waiting = list(CASES)
    running: dict[str, tuple[subprocess.Popen[bytes], Path, int, float]] = {}
    exits: dict[str, tuple[int | None, float, str]] = {}
    healthy = dict.fromkeys(CASES, 0)  # /healthz ok answers, for the report: ok while the engine is still opening
    try:
        while waiting or running:
            while waiting and len(running) < PARALLEL:
                case = waiting.pop(0)
                running[case] = _spawn(case, endoarss_bundle, tmp_path)
            for case, (proc, log, port, started) in list(running.items()):
                took = time.monotonic() - started
                if proc.poll() is not None or took > EXIT_WITHIN_S:
                    stop_process(proc)
                    exits[case] = (proc.returncode if took <= EXIT_WITHIN_S else None, took, log.read_text("utf-8"))
                    del running[case]
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    healthy[case] += httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            time.sleep(0.1)
    finally:
        for proc, *_ in running.values():
            stop_process(proc)
    for case, (code, took, _) in exits.items():
        print(f"{case}: exit {code} after {took:.1f} s (healthz ok {healthy[case]}x before)")
    for case, (code, took, text) in exits.items():
        assert code not in (None, 0), f"{case}: still running or exited 0 after {took:.1f} s:\n{text[-3000:]}"
        # log records at ERROR, or the CLI's `endostream serve: error:` line (a traceback's last line is neither)
        phrase = CASES[case][1]
        lines = [line for line in text.splitlines() if phrase in line and (" ERROR " in line or ": error: " in line)]
        assert len(lines) == 1, f"{case}: want one error line with {phrase!r}:\n{text}"
        assert "Traceback" not in text, f"{case}: a traceback at the default log level:\n{text}"


def test_healthz_reports_a_failed_engine(endoarss_bundle: Path, tmp_path: Path) -> None:
    """Without `endostream serve` to exit (the app run by another ASGI server), liveness itself says failed."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    bundle = tmp_path / "bundle"
    shutil.copytree(endoarss_bundle, bundle)
    garbage_graph(bundle)
    with TestClient(create_app(Settings(bundle=bundle, threads=1))) as client:
        deadline = time.monotonic() + EXIT_WITHIN_S
        while (reply := client.get("/healthz")).status_code == 200:
            assert time.monotonic() < deadline, "/healthz still ok long after the engine failed"
            time.sleep(0.05)
        assert reply.status_code == 503 and reply.json()["status"] == "failed"
        assert client.get("/readyz").status_code == 503

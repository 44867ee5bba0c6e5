"""Settings from ENDOSTREAM_* variables, flags over them, and one-line errors for bad values or bundles."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from endostream.commands.serve import add_serve_arguments, settings_from_args
from service.settings import Settings


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENDOSTREAM_MAX_BATCH", "4")
    monkeypatch.setenv("ENDOSTREAM_PORT", "9000")
    monkeypatch.setenv("ENDOSTREAM_STREAM_ALLOWLIST", "rtsp://10.0.0.5:8554/, file:/data/clips/")
    settings = settings_from_args(_args("--port", "8123"))
    assert settings.max_batch == 4 and settings.port == 8123
    assert settings.stream_allowlist == ["rtsp://10.0.0.5:8554/", "file:/data/clips/"]
    assert settings_from_args(_args("--stream-allowlist", "http://cam/")).stream_allowlist == ["http://cam/"]


def test_unsafe_or_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(api_token="short")
    assert Settings(api_token="  ").api_token is None
    with pytest.raises(ValueError, match="ENDOSTREAM_API_TOKEN"):
        Settings(cors_origins="*", host="0.0.0.0")
    monkeypatch.setenv("ENDOSTREAM_QUEUE_LIMIT", "0")
    with pytest.raises(ValueError, match="queue_limit"):
        settings_from_args(_args())


@pytest.mark.parametrize(
    "env,argv,message",
    [
        ({}, ["--bundle", "/no/such/bundle"], "is not a bundle: no manifest.json"),
        ({"ENDOSTREAM_MAX_BATCH": "0"}, ["--bundle", "/no/such/bundle"], "max_batch"),
    ],
)
def test_serve_reports_one_clear_line(env, argv, message, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    done = subprocess.run(
        [sys.executable, "-m", "endostream", "serve", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr

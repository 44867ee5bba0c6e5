"""Fixtures for the reliability suite: the tiny bundle comes from tests/conftest.py, RTSP helpers from tests/service."""

from tests.service.rtsp import rtsp_server, video_clip  # noqa: F401 - fixtures

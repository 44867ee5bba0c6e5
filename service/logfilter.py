"""Keep secrets out of the log: a `logging.Filter` that masks `token=` query values and the API token itself.

WebSocket clients may pass the token as `?token=` (browsers cannot set headers on a WebSocket), and uvicorn logs
every WebSocket handshake (`"WebSocket /ws/infer?token=..." [accepted]`, or `403` when refused), as does its access
log when an operator turns it on. The filter is attached to uvicorn's handlers through its `log_config` and to the
root logger's handlers, so every line that reaches stderr or stdout passes it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from typing import Any

import uvicorn.config

MASK = "***"
# `token=` or `access_token=` in a query string or anywhere in a message; the value ends at &, whitespace or a quote
_QUERY_TOKEN = re.compile(r"(?i)\b((?:access_)?token=)[^&\s\"'#]*")


class RedactSecrets(logging.Filter):
    """Rewrites each record's message and arguments with secrets masked; never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def redact(self, text: str) -> str:
        text = _QUERY_TOKEN.sub(rf"\1{MASK}", text)
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, tuple):  # uvicorn's access formatter unpacks its args tuple: keep the shape
            return tuple(self._clean(v) for v in value)
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = self._clean(record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        return True


def uvicorn_log_config(secrets: Iterable[str] = ()) -> dict[str, Any]:
    """uvicorn's default logging config with `RedactSecrets` on its handlers (pass as `log_config`)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_secrets"] = {"()": RedactSecrets, "secrets": list(secrets)}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_secrets")
    return config


def redact_root_handlers(secrets: Iterable[str] = ()) -> None:
    """Attach `RedactSecrets` to the root logger's handlers (library loggers such as `websockets` end up there)."""
    redactor = RedactSecrets(secrets)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(redactor)

"""Domain errors and the one JSON error body shared by replies, stream lines and WebSocket messages."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """An error the client caused or must react to; carries the HTTP status and the offending parameter."""

    status: int = 400

    def __init__(self, code: str, message: str, *, param: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.value = value

    def headers(self) -> dict[str, str] | None:
        """Response headers the status calls for (Retry-After, WWW-Authenticate)."""
        retry_after = getattr(self, "retry_after", None)
        return {"Retry-After": str(retry_after)} if retry_after is not None else None

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.value is not None:
            error["value"] = self.value if isinstance(self.value, int | float | bool) else str(self.value)[:200]
        return {"error": error}


class BadInput(ServiceError):
    status = 400


class PayloadTooLarge(ServiceError):
    status = 413


class RequestTimeout(ServiceError):
    """The request body did not arrive in time (408)."""

    status = 408


class UnsupportedMediaType(ServiceError):
    status = 415


class Unauthorized(ServiceError):
    status = 401

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": 'Bearer realm="endostream"'}  # RFC 6750 section 3: required on a 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class TooManyStreams(ServiceError):
    """ENDOSTREAM_MAX_STREAMS streams are already open: a client error (429), not a server fault."""

    status = 429

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__("too_many_streams", message, param="source")
        self.retry_after = retry_after


class Overloaded(ServiceError):
    """The engine queue is full: retry after `retry_after` seconds (503 + Retry-After)."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__("overloaded", message)
        self.retry_after = retry_after


class NotReady(ServiceError):
    status = 503

    def __init__(self, message: str = "the engine is still loading or warming up; retry shortly") -> None:
        super().__init__("not_ready", message)
        self.retry_after = 2

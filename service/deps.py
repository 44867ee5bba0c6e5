"""Request dependencies: the app's state objects and the bearer-token check.

All are `async def` although none awaits: FastAPI runs a plain `def` dependency in a worker thread, which would
cost every frame an extra thread hop before its decode even starts.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, WebSocket

from service.errors import NotReady, Unauthorized
from service.serving import InferenceService
from service.settings import Settings
from service.state import AppState


async def app_state(request: Request) -> AppState:
    return request.app.state.endostream


async def ready_service(request: Request) -> InferenceService:
    state: AppState = request.app.state.endostream
    if not state.batcher.ready:
        raise NotReady()
    return state.service


def token_matches(settings: Settings, authorization: str | None, query_token: str | None = None) -> bool:
    """Constant-time check of `Authorization: Bearer <token>` (or a `token` query parameter, for WebSockets)."""
    if settings.api_token is None:
        return True
    presented = None
    if authorization and authorization.lower().startswith("bearer "):
        presented = authorization[7:].strip()
    elif query_token:
        presented = query_token
    return presented is not None and secrets.compare_digest(presented.encode(), settings.api_token.encode())


async def require_token(request: Request) -> None:
    state: AppState = request.app.state.endostream
    if not token_matches(state.settings, request.headers.get("authorization")):
        state.metrics.rejected.labels("unauthorized").inc()
        raise Unauthorized("unauthorized", "send `Authorization: Bearer <ENDOSTREAM_API_TOKEN>`")


def websocket_authorized(websocket: WebSocket) -> bool:
    state: AppState = websocket.app.state.endostream
    ok = token_matches(state.settings, websocket.headers.get("authorization"), websocket.query_params.get("token"))
    if not ok:
        state.metrics.rejected.labels("unauthorized").inc()
    return ok


State = Annotated[AppState, Depends(app_state)]
Service = Annotated[InferenceService, Depends(ready_service)]
Authorized = Depends(require_token)

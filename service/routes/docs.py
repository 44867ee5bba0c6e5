"""`/openapi.json`, `/docs` and `/redoc` behind the bearer token, used instead of FastAPI's open ones when
ENDOSTREAM_API_TOKEN is set: the API description is part of the API the token guards.

Browsers cannot add `Authorization` when they navigate, so with a token the pages are for clients that can
(`curl -H "Authorization: Bearer $TOKEN" http://HOST/openapi.json`, or a header-injecting proxy).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from service.deps import Authorized

router = APIRouter(include_in_schema=False, dependencies=[Authorized])


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - Swagger UI")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")

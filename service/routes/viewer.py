"""`GET /`: the viewer page (static HTML + JS, no build step), and its assets under `/static`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(tags=["viewer"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {"viewer.js": "text/javascript", "viewer.css": "text/css"}


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        raise HTTPException(404)
    return FileResponse(STATIC / name, media_type=ASSETS[name])

"""The demo page: ``GET /`` and its static files under ``/static/`` (``service/static/``).

Plain files shipped as package data: no build step, no CDN, nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from service.api.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page is tiny and changes with the service version: let browsers revalidate.
_HEADERS = {"Cache-Control": "no-cache"}

_background: set[asyncio.Future[None]] = set()  # strong refs to fire-and-forget tasks

router = APIRouter(tags=["demo"], include_in_schema=False)


@router.head("/")
async def index_head() -> Response:
    # Uptime monitors probe the root with HEAD (was 405); no shap warm-up for them.
    return Response(media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)


@router.get("/")
async def index(request: Request) -> FileResponse:
    # Someone is about to use the page: load shap now (in a thread) rather than on their
    # first "explain" click, which would otherwise pay its ~5 s import and JIT.
    from service.api.routes.explain import warm_up_explain

    _background.add(task := asyncio.ensure_future(warm_up_explain(request.app)))
    task.add_done_callback(_background.discard)
    return FileResponse(
        STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_HEADERS
    )


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    # Only plain files directly in STATIC_DIR with a known type: no path tricks possible.
    path = STATIC_DIR / name
    media = _MEDIA_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or media is None or not path.is_file():
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return FileResponse(path, media_type=media, headers=_HEADERS)

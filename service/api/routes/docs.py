"""The interactive API docs, ``/docs`` (Swagger UI) and ``/redoc``, with their scripts served
from this process: FastAPI's default pages load them from a CDN, so on a machine without
internet (or behind a gateway that blocks it) they were blank pages. The assets come from the
``fastapi-offline`` package (Swagger UI 5, ReDoc 2; MIT)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse

from service.api.errors import ApiError

ASSETS_PREFIX = "/docs-assets"
_MEDIA_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# The assets change only with the installed package version.
_HEADERS = {"Cache-Control": "public, max-age=86400"}

router = APIRouter(tags=["docs"], include_in_schema=False)


def _with_lang(page: HTMLResponse) -> HTMLResponse:
    """FastAPI's pages open with a bare ``<html>``: screen readers then guess the language
    the page is read in (WCAG 3.1.1; axe-core's html-has-lang, serious). Their text, ours and
    Swagger UI's / ReDoc's, is English."""
    body = bytes(page.body).replace(b"<html>", b'<html lang="en">', 1)
    return HTMLResponse(body, status_code=page.status_code)


def assets_dir() -> Path | None:
    try:
        import fastapi_offline
    except ImportError:
        return None
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _assets_or_404() -> Path:
    folder = assets_dir()
    if folder is None:
        raise ApiError(
            404, "not_found", "the API docs pages need the fastapi-offline package; "
            "/openapi.json has the same content"
        )  # fmt: skip
    return folder


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    _assets_or_404()
    base, app = _base(request), request.app
    return _with_lang(
        get_swagger_ui_html(
            openapi_url=f"{base}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{base}/docs/oauth2-redirect",
            swagger_js_url=f"{base}{ASSETS_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{base}{ASSETS_PREFIX}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
    )


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    _assets_or_404()
    base, app = _base(request), request.app
    return _with_lang(
        get_redoc_html(
            openapi_url=f"{base}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{ASSETS_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{ASSETS_PREFIX}/favicon.png",
            with_google_fonts=False,
        )
    )


@router.get(ASSETS_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    media = _MEDIA_TYPES.get(name)  # a fixed list of names: no path tricks possible
    if media is None:
        raise ApiError(404, "not_found", f"no docs asset {name!r}")
    return FileResponse(_assets_or_404() / name, media_type=media, headers=_HEADERS)

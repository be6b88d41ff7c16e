"""The pages a person opens in a browser: ``/ui`` (try and inspect the metric), ``/docs`` (Swagger UI)
and their static assets, all served by the app itself, so that they work without internet.

The page and the docs hold no data; every API call they make sends the key typed into the page (kept
in the tab's ``sessionStorage``), so they can be open while the API needs a key
(``RLPIPS_OPEN_PAGES``). Swagger UI's assets come from the maintained ``fastapi-offline`` package
(Swagger UI is Apache-2.0, the package MIT); the page's own assets live in ``app/api/static``. Links
are relative, so the pages also work under a proxy's path prefix.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from app.api.errors import ApiError

router = APIRouter(include_in_schema=False)

_OWN = Path(str(files("app.api") / "static"))
_SWAGGER = Path(str(files("fastapi_offline") / "static"))

#: Every static asset by the name it is served under (``/static/<name>``), and its file.
ASSETS: dict[str, Path] = {
    "ui.js": _OWN / "ui.js",
    "ui.css": _OWN / "ui.css",
    "docs.js": _OWN / "docs.js",
    "swagger-ui-bundle.js": _SWAGGER / "swagger-ui-bundle.js",
    "swagger-ui.css": _SWAGGER / "swagger-ui.css",
    "favicon.png": _SWAGGER / "favicon.png",
}

#: The paths that need no API key when the pages are open.
PAGE_PATHS = frozenset({"/", "/ui", "/docs", *(f"/static/{name}" for name in ASSETS)})

#: Nothing from another origin, no inline script or style: the page can only talk to this service.
UI_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

_DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>R-LPIPS similarity service — API docs</title>
<link rel="icon" href="static/favicon.png">
<link rel="stylesheet" href="static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="static/swagger-ui-bundle.js"></script>
<script src="static/docs.js"></script>
</body>
</html>
"""


@router.get("/")
async def root(request: Request) -> RedirectResponse:
    """The page (under the proxy's path prefix, if any)."""
    return RedirectResponse(f"{request.scope.get('root_path', '')}/ui", status_code=307)


@router.api_route("/ui", methods=["GET", "HEAD"])
async def ui() -> FileResponse:
    return FileResponse(
        _OWN / "ui.html",
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": UI_POLICY, "Cache-Control": "no-cache"},
    )


@router.api_route("/docs", methods=["GET", "HEAD"])
async def docs() -> Response:
    return Response(_DOCS_HTML, media_type="text/html; charset=utf-8")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise ApiError("not_found", f"no static asset {name!r}")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

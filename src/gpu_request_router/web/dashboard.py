"""Serve the dashboard: ``/ui`` (the page), ``/ui/assets/`` (its scripts and styles), ``/``.

The page itself is public, as a login form is; every piece of data it shows comes from the
``/v1/`` API, called by the browser with ``Authorization: Bearer <key>`` like any client, so a
key sees in the dashboard exactly what it sees through the API. A Content-Security-Policy
limits the page to its own origin: scripts, styles and connections go nowhere else.

Example::

    app = FastAPI()
    install_dashboard(app)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_PATH", "UI_PATH", "install_dashboard"]

UI_PATH = "/ui"
ASSETS_PATH = "/ui/assets"
_HERE = Path(str(files("gpu_request_router.web")))
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
}


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard's routes to ``app``: the page, its assets, and ``/`` leading to it."""
    page = (_HERE / "index.html").read_text(encoding="utf-8")
    app.mount(ASSETS_PATH, StaticFiles(directory=_HERE / "assets"), name="ui-assets")

    @app.get(UI_PATH, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=_HEADERS)

    @app.get("/", include_in_schema=False)
    @app.get(f"{UI_PATH}/", include_in_schema=False)
    async def to_dashboard(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '')}{UI_PATH}")

"""The Swagger UI page at ``/docs``, served with its scripts and styles from the package.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, so on a machine without internet it renders
blank. Here the page's assets come from the ``fastapi-offline`` package (Swagger UI 5 and its
CSS, MIT) and are served by the application itself under ``/docs/assets/``; the page names no
other host, and Swagger UI's online validator badge is off. ReDoc stays disabled.

Example::

    app = FastAPI(docs_url=None, redoc_url=None)
    install_docs_page(app)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_PATH", "DOCS_PATH", "install_docs_page"]

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
_ASSETS = Path(str(files("fastapi_offline") / "static"))


def install_docs_page(app: FastAPI) -> None:
    """Serve Swagger UI for ``app``'s OpenAPI document at ``/docs``, with no CDN.

    ``app`` is built with ``docs_url=None`` (FastAPI's CDN page off) and an ``openapi_url``.
    """
    openapi_url = app.openapi_url
    if openapi_url is None or app.docs_url is not None:
        raise ValueError("build the application with docs_url=None and an openapi_url")
    oauth2_redirect = f"{DOCS_PATH}/oauth2-redirect"
    app.mount(ASSETS_PATH, StaticFiles(directory=_ASSETS), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

"""``/docs`` works offline: the page names no other host and its assets come from the app itself."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import FastAPI

from gpu_request_router.api import create_app
from gpu_request_router.config.config_loader import load_settings
from gpu_request_router.http.docs_page import install_docs_page
from gpu_request_router.testing import make_settings
from gpu_request_router.worker.app import create_worker_app

ROUTER = create_app(make_settings())
WORKER = create_worker_app(load_settings(overrides={"worker": {"simulate": "1xH100-80GB"}}))
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def _references(page: str) -> list[str]:
    """Every URL the page loads: stylesheets, icons, scripts and the OpenAPI document."""
    return re.findall(r'(?:href|src)="([^"]+)"', page) + re.findall(r"url: '([^']+)'", page)


@pytest.mark.parametrize("app", [ROUTER, WORKER], ids=["router", "worker"])
async def test_the_docs_page_loads_only_what_the_app_itself_serves(app: FastAPI) -> None:
    """No http(s):// anywhere in the page; each URL it loads answers 200 from the same app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "http://" not in page.text and "https://" not in page.text
        assert '"validatorUrl": null' in page.text, "Swagger UI's online validator badge is off"
        references = _references(page.text)
        assert {url.rsplit(".", 1)[-1] for url in references} == {"css", "png", "js", "json"}
        for url in references:
            assert url.startswith("/"), url
            answer = await client.get(url)
            assert answer.status_code == 200, url
            kind = next((v for k, v in ASSET_TYPES.items() if url.endswith(k)), "json")
            assert kind in answer.headers["content-type"], (url, answer.headers["content-type"])
        bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
        assert "SwaggerUIBundle" in bundle.text
        # Swagger UI 5 reads OpenAPI 3.1, the version FastAPI writes.
        assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.1")
        assert (await client.get("/docs/oauth2-redirect")).status_code == 200
        assert (await client.get("/redoc")).status_code == 404, "ReDoc stays disabled"


async def test_the_page_follows_a_root_path() -> None:
    """Behind a proxy that mounts the router under a prefix, the page's URLs carry the prefix."""
    transport = httpx.ASGITransport(app=ROUTER, root_path="/router")
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        page = (await client.get("/docs")).text
    assert all(url.startswith("/router/") for url in _references(page)), _references(page)


def test_an_app_with_fastapis_cdn_page_is_refused() -> None:
    """Installing over FastAPI's own /docs (which loads from a CDN) is a programming error."""
    with pytest.raises(ValueError, match="docs_url=None"):
        install_docs_page(FastAPI())

"""The dashboard's page and assets as the router serves them (the browser tests drive them)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gpu_request_router.web import ASSETS_PATH

if TYPE_CHECKING:
    from conftest import LiveServer

# Every place a page or module names another file: src/href attributes, `import ... from`.
_REFERENCE = re.compile(r"""(?:src|href)="([^"#]+)"|from "(\./[^"]+)\"""")
_SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def test_root_leads_to_the_dashboard(server: LiveServer) -> None:
    """GET / and GET /ui/ redirect to /ui, which is the page, with a same-origin-only policy."""
    client = server.client()
    for path in ("/", "/ui/"):
        response = client.get(path)
        assert response.status_code == 307 and response.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert 'id="login-form"' in page.text


def test_every_asset_is_served_and_none_comes_from_another_host(server: LiveServer) -> None:
    """Each file the page and its modules name is served by the router; no other host is named."""
    client = server.client()
    pending = [("/ui", "ui/assets/app.js")]
    page = client.get("/ui").text
    pending += [("/ui", first) for first, _ in _REFERENCE.findall(page) if first]
    seen: set[str] = set()
    while pending:
        source, reference = pending.pop()
        if reference.startswith("data:"):
            continue
        path = (
            f"{ASSETS_PATH}/{reference.removeprefix('./')}"
            if reference.startswith("./")
            else f"/{reference}"
        )
        if path in seen:
            continue
        seen.add(path)
        response = client.get(path)
        assert response.status_code == 200, f"{source} names {reference}: {response.status_code}"
        text = response.text.replace(_SVG_NAMESPACE, "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
        pending += [(path, module) for _, module in _REFERENCE.findall(text) if module]
    assert {
        f"{ASSETS_PATH}/{name}"
        for name in ("app.js", "api.js", "charts.js", "dom.js", "gpus.js", "lists.js", "request.js")
    } <= seen
    assert f"{ASSETS_PATH}/style.css" in seen

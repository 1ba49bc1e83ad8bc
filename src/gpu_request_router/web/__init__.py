"""The dashboard at ``/ui``: a page and its assets, served by the router itself.

The page (``index.html``) and its CSS and JavaScript modules (``assets/``) are package data: no
build step, and nothing loaded from another host. It holds no data of its own: the browser reads the
JSON API under ``/v1/`` with the API key the user types in (:mod:`.dashboard`).
"""

from gpu_request_router.web.dashboard import ASSETS_PATH, UI_PATH, install_dashboard

__all__ = ["ASSETS_PATH", "UI_PATH", "install_dashboard"]

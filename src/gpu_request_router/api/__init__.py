"""The HTTP API (SPEC §5): a FastAPI application assembled in :func:`create_app`."""

from gpu_request_router.api.app import create_app

__all__ = ["create_app"]

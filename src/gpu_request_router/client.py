"""A small HTTP client of the router API, used by the CLI (and handy in scripts).

Example::

    with RouterClient("http://127.0.0.1:8080", api_key) as client:
        request = client.submit({"model": "llama-3-8b", "input": {...}})
        done = client.wait(request["id"], timeout_s=120)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from itertools import islice
from types import TracebackType
from typing import Any, Self

import httpx

__all__ = ["DEFAULT_URL", "ApiError", "RouterClient"]

DEFAULT_URL = "http://127.0.0.1:8080"
_TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class ApiError(Exception):
    """The router answered with an error (its problem details are in ``problem``)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        detail = problem.get("detail") or problem.get("title") or "error"
        super().__init__(f"{status} {problem.get('title', '')}: {detail}".strip())
        self.status = status
        self.problem = problem


class RouterClient:
    """Calls the router's HTTP API; ``url`` and ``api_key`` default to the environment.

    ``GPUROUTER_URL`` (default ``http://127.0.0.1:8080``) and ``GPUROUTER_API_KEY``.
    """

    def __init__(
        self, url: str | None = None, api_key: str | None = None, *, timeout_s: float = 75.0
    ) -> None:
        base = url or os.environ.get("GPUROUTER_URL") or DEFAULT_URL
        key = api_key if api_key is not None else os.environ.get("GPUROUTER_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=base, headers=headers, timeout=timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """The router's URL."""
        return str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:200]}
            raise ApiError(response.status_code, problem)
        return response.json()

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a request (``POST /v1/requests``)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._call("POST", "/v1/requests", json=body, headers=headers)
        return result

    def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Estimate a request without queueing it (``POST /v1/estimate``)."""
        result: dict[str, Any] = self._call("POST", "/v1/estimate", json=body)
        return result

    def get(self, request_id: str, wait_s: float | None = None) -> dict[str, Any]:
        """A request, optionally long-polling up to ``wait_s`` (≤ 60) for its end."""
        params = {"wait": wait_s} if wait_s else None
        result: dict[str, Any] = self._call("GET", f"/v1/requests/{request_id}", params=params)
        return result

    def wait(self, request_id: str, timeout_s: float) -> dict[str, Any]:
        """The request once terminal, or as it is when ``timeout_s`` has passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            request = self.get(request_id, wait_s=min(60.0, max(left, 0.0)) or None)
            if request["status"] in _TERMINAL or deadline - time.monotonic() <= 0:
                return request

    def cancel(self, request_id: str) -> dict[str, Any]:
        """Cancel a request (``DELETE /v1/requests/{id}``)."""
        result: dict[str, Any] = self._call("DELETE", f"/v1/requests/{request_id}")
        return result

    def explain(self, request_id: str) -> dict[str, Any]:
        """Where a request was placed and why, or why it waits (``GET .../explain``)."""
        result: dict[str, Any] = self._call("GET", f"/v1/requests/{request_id}/explain")
        return result

    def page(self, *, limit: int = 50, **filters: Any) -> list[dict[str, Any]]:
        """The first page of requests, newest first (``limit`` ≤ 500): one call."""
        return list(islice(self.requests(limit=limit, **filters), limit))

    def requests(self, *, limit: int = 50, **filters: Any) -> Iterator[dict[str, Any]]:
        """Requests newest first, following cursors page by page."""
        params: dict[str, Any] = {key: value for key, value in filters.items() if value}
        params["limit"] = limit
        while True:
            page = self._call("GET", "/v1/requests", params=params)
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def gpus(self) -> list[dict[str, Any]]:
        """Every GPU the router knows."""
        items: list[dict[str, Any]] = self._call("GET", "/v1/gpus")["items"]
        return items

    def metrics(self) -> dict[str, Any]:
        """The JSON metrics summary (``GET /v1/metrics``)."""
        result: dict[str, Any] = self._call("GET", "/v1/metrics")
        return result

    def quota(self) -> dict[str, Any]:
        """Your own limits and live usage (``GET /v1/quota``)."""
        result: dict[str, Any] = self._call("GET", "/v1/quota")
        return result

    def users(self) -> list[dict[str, Any]]:
        """Every user with their limits and live usage (admins only: ``GET /v1/users``)."""
        items: list[dict[str, Any]] = self._call("GET", "/v1/users")["items"]
        return items

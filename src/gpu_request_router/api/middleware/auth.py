"""Authentication: Bearer API keys checked against SHA-256 hashes, roles, failure throttling.

:class:`AuthMiddleware` authenticates every ``/v1/`` call (and ``/metrics`` when
``server.metrics_require_auth``) before routing or parsing a body, so an unauthenticated call
learns nothing else about the API and costs nothing more.

Only hashes of keys are kept (``auth.users[].api_key_sha256``). A presented key is hashed and
looked up by its hash, then compared in constant time (``hmac.compare_digest``). Unknown,
malformed and missing keys get the same answer. A client (by address) that presents too many bad
keys within a minute is refused with 429 until the minute has passed,
a stricter limit than any quota (OWASP API2); ``auth.max_failures_per_minute`` sets it. Calls
without any key are refused but not counted, so keyless probes cannot lock real users out.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.api.middleware.error_handler import error_response
from gpu_request_router.config.config_loader import AuthSettings
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.exceptions import (
    AuthError,
    Forbidden,
    TooManyAuthFailures,
    Unauthenticated,
)

__all__ = [
    "ANONYMOUS",
    "WORKER_PREFIX",
    "AuthMiddleware",
    "Authenticator",
    "bearer_key",
    "hash_key",
]

# Workers authenticate with the shared worker token and act as "worker:<name>".
WORKER_PREFIX = "worker:"
WORKER_PATH = "/v1/workers"

ANONYMOUS = Caller("anonymous", admin=True)
_WINDOW_S = 60.0
_MAX_TRACKED_CLIENTS = 10_000


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key, as ``api_key_sha256`` stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _User:
    name: str
    admin: bool
    digest: str


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Caller`."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float]) -> None:
        self.enabled = settings.enabled
        self._users = {
            entry.api_key_sha256: _User(entry.name, entry.role == "admin", entry.api_key_sha256)
            for entry in settings.users
        }
        self._roles = {entry.name: entry.role for entry in settings.users}
        token = settings.worker_token
        self._worker_digest = hash_key(token) if token else None
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._max_failures = settings.max_failures_per_minute

    @property
    def roles(self) -> dict[str, str]:
        """Every configured user and their role."""
        if not self.enabled:
            return {ANONYMOUS.user: "admin"}
        return dict(self._roles)

    def authenticate(self, key: str | None, client: str) -> Caller:
        """The caller a Bearer ``key`` belongs to.

        Raises:
            TooManyAuthFailures: ``client`` sent too many bad keys in the last minute.
            Unauthenticated: the key is missing or unknown.
        """
        if not self.enabled:
            return ANONYMOUS
        now = self._clock()
        self._check_throttle(client, now)
        if not key:
            raise Unauthenticated()
        digest = hash_key(key)
        user = self._users.get(digest)
        if user is None or not hmac.compare_digest(user.digest, digest):
            self._fail(client, now)
            raise Unauthenticated()
        return Caller(user.name, admin=user.admin)

    def _check_throttle(self, client: str, now: float) -> None:
        failures = self._failures.get(client)
        if failures is not None:
            while failures and failures[0] <= now - _WINDOW_S:
                failures.popleft()
            if len(failures) >= self._max_failures:
                raise TooManyAuthFailures(failures[0] + _WINDOW_S - now)

    def _fail(self, client: str, now: float) -> None:
        if client not in self._failures and len(self._failures) >= _MAX_TRACKED_CLIENTS:
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(client, deque()).append(now)

    def authenticate_worker(self, key: str | None, client: str) -> Caller:
        """A worker presenting the shared worker token.

        Raises:
            Forbidden: no worker token is configured (registration is off).
            TooManyAuthFailures: ``client`` sent too many bad keys in the last minute.
            Unauthenticated: the token is missing or wrong.
        """
        now = self._clock()
        self._check_throttle(client, now)
        if not key:
            raise Unauthenticated()
        if self._worker_digest is None:
            raise Forbidden("worker registration is off: no auth.worker_token is configured")
        if not hmac.compare_digest(self._worker_digest, hash_key(key)):
            self._fail(client, now)
            raise Unauthenticated()
        return Caller(f"{WORKER_PREFIX}{client}")

    @staticmethod
    def require_admin(caller: Caller) -> Caller:
        """``caller`` if they are an administrator.

        Raises:
            Forbidden: they are not.
        """
        if not caller.admin:
            raise Forbidden("this needs the admin role")
        return caller


def bearer_key(scope: Scope) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme in any case), or ``None``."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").strip().partition(" ")
            return key.strip() or None if scheme.lower() == "bearer" else None
    return None


class AuthMiddleware:
    """Authenticates protected paths first; the caller goes to ``scope["state"]["caller"]``."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, protect_metrics: bool) -> None:
        self.app = app
        self.authenticator = authenticator
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] == "http" and self._protected(scope["path"]):
            client = scope["client"][0] if scope.get("client") else "unknown"
            check = (
                self.authenticator.authenticate_worker
                if scope["path"] == WORKER_PATH
                else self.authenticator.authenticate
            )
            try:
                caller = check(bearer_key(scope), client)
            except AuthError as exc:
                await error_response(Request(scope), exc)(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
            structlog.contextvars.bind_contextvars(user=caller.user)
        await self.app(scope, receive, send)

    def _protected(self, path: str) -> bool:
        return path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

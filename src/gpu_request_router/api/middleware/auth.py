"""Authentication: Bearer API keys checked against SHA-256 hashes, roles, failure throttling.

:class:`AuthMiddleware` authenticates every ``/v1/`` call (and ``/metrics`` when
``server.metrics_require_auth``) before routing or parsing a body, so an unauthenticated call
learns nothing else about the API and costs nothing more.

Only hashes of keys are kept (``auth.users[].api_key_sha256``). A presented key is hashed and
looked up by its hash, then compared in constant time (``hmac.compare_digest``). Unknown,
malformed and missing keys get the same answer.

Bad keys are throttled, a stricter limit than any quota (OWASP API2): more than
``auth.max_failures_per_minute`` of them within a minute from one client address, or starting
with the same :data:`KEY_PREFIX_CHARS` characters from anywhere, and further bad keys of that
address or prefix get 429 until the minute has passed. A valid key is never refused by this
limit, so one client presenting bad keys behind a proxy or NAT locks nobody else out. Calls
without any key are refused (429 from a throttled address) but not counted, so keyless probes
cannot throttle anyone. The client address is the socket's peer, or the client a trusted proxy
names (:mod:`~gpu_request_router.api.middleware.client_address`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.api.middleware.client_address import ClientAddress
from gpu_request_router.api.middleware.failure_limiter import FailureLimiter
from gpu_request_router.config.config_loader import AuthSettings
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.exceptions import (
    AuthError,
    Forbidden,
    TooManyAuthFailures,
    Unauthenticated,
)
from gpu_request_router.http.keys import bearer_key, hash_key
from gpu_request_router.http.problems import error_response

__all__ = [
    "ANONYMOUS",
    "KEY_PREFIX_CHARS",
    "WORKER_PREFIX",
    "AuthMiddleware",
    "Authenticator",
]

# Workers authenticate with the shared worker token and act as "worker:<name>".
WORKER_PREFIX = "worker:"
WORKER_PATH = "/v1/workers"

ANONYMOUS = Caller("anonymous", admin=True)
KEY_PREFIX_CHARS = 8
"""Bad keys sharing this many first characters are throttled together, from any address."""
_WINDOW_S = 60.0


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
        limit = settings.max_failures_per_minute
        self._by_address = FailureLimiter(limit, window_s=_WINDOW_S)
        self._by_prefix = FailureLimiter(limit, window_s=_WINDOW_S)

    @property
    def roles(self) -> dict[str, str]:
        """Every configured user and their role."""
        if not self.enabled:
            return {ANONYMOUS.user: "admin"}
        return dict(self._roles)

    def authenticate(self, key: str | None, client: str) -> Caller:
        """The caller a Bearer ``key`` belongs to.

        Raises:
            TooManyAuthFailures: the key is not valid, and ``client`` or the key's prefix had
                too many bad keys in the last minute.
            Unauthenticated: the key is missing or unknown.
        """
        if not self.enabled:
            return ANONYMOUS
        if key:
            digest = hash_key(key)
            user = self._users.get(digest)
            if user is not None and hmac.compare_digest(user.digest, digest):
                return Caller(user.name, admin=user.admin)
        self._refuse(key, client)

    def authenticate_worker(self, key: str | None, client: str) -> Caller:
        """A worker presenting the shared worker token.

        Raises:
            Forbidden: a token is presented but none is configured (registration is off); it
                is not counted as a bad key, there being no secret to guess.
            TooManyAuthFailures: the token is not valid, and ``client`` or the token's prefix
                had too many bad keys in the last minute.
            Unauthenticated: the token is missing or wrong.
        """
        if key:
            if self._worker_digest is None:
                raise Forbidden("worker registration is off: no auth.worker_token is configured")
            if hmac.compare_digest(self._worker_digest, hash_key(key)):
                return Caller(f"{WORKER_PREFIX}{client}")
        self._refuse(key, client)

    def _refuse(self, key: str | None, client: str) -> NoReturn:
        """Refuse a missing or bad key: 429 while its address or prefix waits, else count it."""
        now = self._clock()
        buckets = [(self._by_address, client)]
        if key:
            buckets.append((self._by_prefix, key[:KEY_PREFIX_CHARS]))
        waits = [limiter.retry_after(bucket, now) for limiter, bucket in buckets]
        if any(wait is not None for wait in waits):
            raise TooManyAuthFailures(max(wait for wait in waits if wait is not None))
        if key:
            for limiter, bucket in buckets:
                limiter.record(bucket, now)
        raise Unauthenticated()

    @staticmethod
    def require_admin(caller: Caller) -> Caller:
        """``caller`` if they are an administrator.

        Raises:
            Forbidden: they are not.
        """
        if not caller.admin:
            raise Forbidden("this needs the admin role")
        return caller


class AuthMiddleware:
    """Authenticates protected paths first; the caller goes to ``scope["state"]["caller"]``."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        client_address: ClientAddress,
        protect_metrics: bool,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.client_address = client_address
        self.protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] == "http" and self._protected(scope["path"]):
            client = self.client_address.of(scope)
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

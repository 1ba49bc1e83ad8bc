"""Quota enforcement: the admission checks at submit and the eligibility check at dispatch.

At submit (:meth:`QuotaEnforcer.admit`): priority above ``max_priority`` and memory above
``max_gpu_memory_mb`` are refused for good (waiting never helps); ``max_queued``,
``gpu_seconds_per_hour`` already used up, and ``requests_per_minute`` are refused with the time
after which a retry can succeed. Then :meth:`QuotaEnforcer.check_room` refuses, with such a
time, while the router as a whole holds ``quotas.max_queued_total`` waiting requests (a bound on
its memory, no user's quota). The rate check is the last one (:meth:`QuotaEnforcer.record`), and
records the admission, so a refused request never counts; one the store could not take is
undone (:meth:`QuotaEnforcer.undo_admission`).

The counters live in memory (:class:`~gpu_request_router.core.usage.UsageLedger`); the store
keeps them with the requests and status changes they ride with, and they are loaded back after a
restart (:meth:`QuotaEnforcer.load`).

At dispatch (:meth:`QuotaEnforcer.blocks_dispatch`): a request waits while its user has
``max_concurrent`` requests dispatching or running, or while its estimated GPU-seconds would take
the user over ``gpu_seconds_per_hour`` in the last hour. GPU-seconds are charged on the estimate
at dispatch and reconciled with the observed time at the end, so the hour's total can pass the
limit by at most what running requests take beyond their estimates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gpu_request_router.config.config_loader import QuotaSettings
from gpu_request_router.core.state_store import Charge, QuotaHistory
from gpu_request_router.core.usage import Admission, UsageLedger
from gpu_request_router.exceptions import (
    InvalidRequest,
    QueueFull,
    QuotaExceeded,
    QuotaForbidden,
)
from gpu_request_router.models.user_quota import QuotaUsage, UserQuota

__all__ = ["HOUR_S", "MINUTE_S", "QuotaEnforcer"]

MINUTE_S = 60.0
HOUR_S = 3600.0


class QuotaEnforcer:
    """Applies each user's :class:`UserQuota`, with its counters in memory."""

    def __init__(self, settings: QuotaSettings, classes: Sequence[str]) -> None:
        self._settings = settings
        self._rank = {name: rank for rank, name in enumerate(classes)}
        self._top = classes[0]
        self._usage = UsageLedger(MINUTE_S, HOUR_S)
        self._overrides: dict[str, dict[str, Any]] = {}
        self._cache: dict[tuple[str, bool], UserQuota] = {}

    def load(self, history: QuotaHistory, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        """Take back the stored counters and run-time overrides (after a restart)."""
        self._usage.load(
            (Admission(user, at, request_id) for user, at, request_id in history.admissions),
            history.charges,
        )
        self._overrides.update({user: dict(values) for user, values in overrides.items()})
        self._cache.clear()

    def replace_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        """Take the run-time overrides as the store now holds them (set by other routers)."""
        if overrides != self._overrides:
            self._overrides = {user: dict(values) for user, values in overrides.items()}
            self._cache.clear()

    @property
    def overrides(self) -> Mapping[str, Mapping[str, Any]]:
        """The run-time overrides, by user."""
        return self._overrides

    def quota_for(self, user: str, *, admin: bool = False) -> UserQuota:
        """The effective quota of ``user``: defaults, then config overrides, then run-time ones.

        An administrator (``admin``) may use every priority class: the default ``max_priority``
        does not apply to them, a ``max_priority`` of their own (config or run-time) does.
        """
        quota = self._cache.get((user, admin))
        if quota is None:
            quota = self._settings.for_user(user)
            configured = self._settings.users.get(user)
            if admin and (configured is None or "max_priority" not in configured.model_fields_set):
                quota = dataclasses.replace(quota, max_priority=self._top)
            override = self._overrides.get(user)
            if override:
                quota = dataclasses.replace(quota, **override)
            self._cache[user, admin] = quota
        return quota

    def set_override(self, user: str, values: Mapping[str, Any]) -> UserQuota:
        """Replace ``user``'s run-time override (``{}``: none); return the new quota.

        The caller persists it (an :class:`~gpu_request_router.core.state_store.OverrideChange`).

        Raises:
            InvalidRequest: a key is not a quota limit, or ``max_priority`` is not a class.
        """
        fields = {field.name for field in dataclasses.fields(UserQuota)} - {"user"}
        unknown = set(values) - fields
        if unknown:
            raise InvalidRequest("quota", f"unknown limit(s): {', '.join(sorted(unknown))}")
        priority = values.get("max_priority")
        if "max_priority" in values and priority not in self._rank:
            raise InvalidRequest("max_priority", f"{priority!r} is not a priority class")
        if values:
            self._overrides[user] = dict(values)
        else:
            self._overrides.pop(user, None)
        self._cache.pop((user, False), None)
        self._cache.pop((user, True), None)
        return self.quota_for(user)

    def admit(
        self,
        user: str,
        *,
        admin: bool = False,
        priority: str,
        memory_mb: int,
        gpu_seconds: float,
        queued: int,
        now: float,
        queue_retry_after_s: Callable[[], float],
    ) -> UserQuota:
        """Check a submission against the user's quota (all but the rate); return the quota.

        The rate check comes last, once every other check has passed (:meth:`record`).

        Args:
            user: who submits.
            admin: whether they are an administrator (see :meth:`quota_for`).
            priority: the class asked for.
            memory_mb: the estimated memory per GPU.
            gpu_seconds: the estimated GPU-seconds of the request.
            queued: how many requests the user has waiting now.
            now: the current time.
            queue_retry_after_s: when a place in the user's queue is expected to free up (asked
                only when the queue limit refuses, since the answer costs a look at running work).

        Raises:
            QuotaForbidden: the request exceeds a limit that waiting never lifts.
            QuotaExceeded: the user is over ``max_queued`` or ``gpu_seconds_per_hour`` for now
                (``retry_after_s`` says how long).
        """
        quota = self.quota_for(user, admin=admin)
        if self._rank[priority] < self._rank[quota.max_priority]:
            raise QuotaForbidden(
                "max_priority",
                f"priority {priority!r} is above your highest allowed class {quota.max_priority!r}",
            )
        if quota.max_gpu_memory_mb is not None and memory_mb > quota.max_gpu_memory_mb:
            raise QuotaForbidden(
                "max_gpu_memory_mb",
                f"the request needs {memory_mb} MiB per GPU; your limit is "
                f"{quota.max_gpu_memory_mb} MiB",
            )
        if quota.gpu_seconds_per_hour is not None:
            if gpu_seconds > quota.gpu_seconds_per_hour:
                raise QuotaForbidden(
                    "gpu_seconds_per_hour",
                    f"the request is estimated at {gpu_seconds:.0f} GPU-seconds; your hourly "
                    f"limit is {quota.gpu_seconds_per_hour:.0f}",
                )
            used = self._usage.gpu_seconds(user, now)
            if used >= quota.gpu_seconds_per_hour:
                oldest = self._usage.oldest_charge(user, now)
                retry = (oldest + HOUR_S - now) if oldest is not None else HOUR_S
                raise QuotaExceeded(
                    "gpu_seconds_per_hour",
                    f"you used {used:.0f} of {quota.gpu_seconds_per_hour:.0f} GPU-seconds "
                    "in the last hour",
                    retry_after_s=max(retry, 0.001),
                )
        if quota.max_queued is not None and queued >= quota.max_queued:
            raise QuotaExceeded(
                "max_queued",
                f"you have {queued} requests waiting; your limit is {quota.max_queued}",
                retry_after_s=max(queue_retry_after_s(), 0.001),
            )
        return quota

    def record(self, quota: UserQuota, request_id: str, now: float) -> None:
        """Record the admission of request ``request_id`` unless it passes the rate limit.

        Raises:
            QuotaExceeded: ``requests_per_minute`` admissions fall within the last minute
                (nothing is recorded).
        """
        wait = self._usage.admit(Admission(quota.user, now, request_id), quota.requests_per_minute)
        if wait is not None:
            raise QuotaExceeded(
                "requests_per_minute",
                f"more than {quota.requests_per_minute} requests in a minute",
                retry_after_s=max(wait, 0.001),
            )

    def undo_admission(self, user: str, request_id: str) -> None:
        """Forget the admission of a request the store could not take."""
        self._usage.undo_admission(user, request_id)

    def charge(self, charge: Charge) -> None:
        """Count an execution's GPU-seconds (again with its id: the amount is replaced)."""
        self._usage.charge(charge)

    def undo_charge(self, user: str, charge_id: str) -> None:
        """Forget a charge whose status change the store could not take."""
        self._usage.undo_charge(user, charge_id)

    def check_room(self, waiting: int, retry_after_s: Callable[[], float]) -> None:
        """Refuse a submission while ``waiting`` requests (of all users) fill the router's queue.

        Args:
            waiting: how many requests wait in the router now, queued or backing off to retry.
            retry_after_s: when a place is expected to free up (asked only on a refusal).

        Raises:
            QueueFull: ``quotas.max_queued_total`` requests are waiting.
        """
        limit = self._settings.max_queued_total
        if limit is not None and waiting >= limit:
            raise QueueFull(waiting, limit, retry_after_s=max(retry_after_s(), 0.001))

    def blocks_dispatch(self, user: str, active: int, gpu_seconds: float, now: float) -> str | None:
        """The quota that keeps a request of ``user`` from starting now, or ``None``.

        ``active`` is how many of the user's requests are dispatching or running.
        """
        quota = self.quota_for(user)
        if quota.max_concurrent is not None and active >= quota.max_concurrent:
            return "max_concurrent"
        if quota.gpu_seconds_per_hour is not None:
            used = self._usage.gpu_seconds(user, now)
            if used + gpu_seconds > quota.gpu_seconds_per_hour:
                return "gpu_seconds_per_hour"
        return None

    def gpu_seconds_frees_at(self, user: str, now: float) -> float | None:
        """When the user's oldest GPU-seconds charge leaves the hour window, or ``None``."""
        oldest = self._usage.oldest_charge(user, now)
        return None if oldest is None else oldest + HOUR_S

    def usage(self, user: str, *, queued: int, concurrent: int, now: float) -> QuotaUsage:
        """The user's live usage."""
        return QuotaUsage(
            user=user,
            requests_last_minute=self._usage.admissions(user, now),
            concurrent=concurrent,
            queued=queued,
            gpu_seconds_last_hour=self._usage.gpu_seconds(user, now),
        )

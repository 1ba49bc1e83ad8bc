"""Admission: validate a submission, apply idempotency, estimate, check quota, store, enqueue.

The order matters: everything that can refuse a request runs before anything is written, and
the rate-limit check, which records the admission, runs last. Refusals that waiting never lifts
(bad input, a request no GPU could hold, a class above the user's) come before those that it does
(the user's own quotas, then the router's bound on waiting requests), so a client is never told
to retry what can never succeed. An idempotent replay of an accepted request is answered before
any of the limits. A refused request changes nothing. An accepted one is queued in memory; its
creation goes out first among the router's decisions, for the driver to persist (and to take back
with :meth:`~gpu_request_router.core.request_router.RequestRouter.forget` if the store cannot).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.events import Decision
from gpu_request_router.core.fit import need_of
from gpu_request_router.core.request_router import RequestRouter, gpu_seconds
from gpu_request_router.exceptions import (
    IdempotencyConflict,
    InvalidRequest,
    RequestRejected,
    Unschedulable,
)
from gpu_request_router.models.request import Estimate, Request, ResourceHints, Shape, Task
from gpu_request_router.utils.ids import IdFactory

__all__ = ["Admission", "Caller", "EstimateReport", "RequestReceiver", "Submission"]

MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_GPU_COUNT = 64
MAX_GPU_MEMORY_MB = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: a user name and whether they are an administrator."""

    user: str
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Submission:
    """A request as a client submits it (the domain form of the API body)."""

    model: str
    task: Task | None = None
    input: Mapping[str, Any] = field(default_factory=dict)
    shape: Shape | None = None
    priority: str | None = None
    resources: ResourceHints = field(default_factory=ResourceHints)
    timeout_s: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """A digest of everything but the idempotency key: equal bodies, equal fingerprints."""
        body = {
            "model": self.model,
            "task": self.task,
            "input": self.input,
            "shape": None if self.shape is None else [*_shape_tuple(self.shape)],
            "priority": self.priority,
            "resources": [
                self.resources.gpu_memory_mb,
                self.resources.gpu_count,
                self.resources.gpu_type,
            ],
            "timeout_s": self.timeout_s,
            "metadata": dict(self.metadata),
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _shape_tuple(shape: Shape) -> tuple[int, int, int]:
    return shape.batch_size, shape.input_tokens, shape.output_tokens


@dataclass(frozen=True, slots=True)
class EstimateReport:
    """The result of a dry run: the estimate and the GPUs that could take the request now."""

    estimate: Estimate
    shape: Shape
    fits_now: list[str]


@dataclass(frozen=True, slots=True)
class Admission:
    """An accepted request, whether it was new, and the decisions its enqueueing produced."""

    request: Request
    created: bool
    decisions: list[Decision]


class RequestReceiver:
    """The front door of the core: turns a :class:`Submission` into a queued :class:`Request`."""

    def __init__(self, settings: Settings, router: RequestRouter, ids: IdFactory) -> None:
        self._settings = settings
        self._router = router
        self._ids = ids

    def estimate(self, submission: Submission, caller: Caller, now: float) -> EstimateReport:
        """Validate and estimate a submission without queueing anything (the dry run)."""
        task, _, _ = self._validate(submission)
        shape, estimate = self._estimate(submission, task)
        draft = self._draft(submission, caller, task, shape, estimate, now)
        need = need_of(draft)
        return EstimateReport(estimate, shape, self._router.fit.fitting_gpus(need))

    def submit(
        self,
        submission: Submission,
        caller: Caller,
        now: float,
        known: Request | None = None,
        *,
        synchronous: bool = False,
    ) -> Admission:
        """Admit a submission: queue it, or raise why not.

        A repeated idempotency key with the same body returns the request it created first:
        a live one, else ``known`` (what the driver found in the store under the key).
        ``synchronous``: its caller waits for the answer on an open connection.

        Raises:
            RequestRejected: any reason the request is refused (see ``exceptions``).
        """
        try:
            return self._submit(submission, caller, now, known, synchronous)
        except RequestRejected as exc:
            self._router.metrics.request_rejected(exc.reason, caller.user)
            raise

    def _submit(
        self,
        submission: Submission,
        caller: Caller,
        now: float,
        known: Request | None,
        synchronous: bool,
    ) -> Admission:
        task, priority, timeout_s = self._validate(submission)
        fingerprint = ""  # only an idempotent replay is compared with what was stored
        if submission.idempotency_key is not None:
            fingerprint = submission.fingerprint()
            key = submission.idempotency_key
            existing = self._router.find_live(caller.user, key) or known
            if existing is not None:
                if existing.fingerprint != fingerprint:
                    raise IdempotencyConflict(key, existing.id)
                return Admission(existing.snapshot(), created=False, decisions=[])
        shape, estimate = self._estimate(submission, task)
        request = self._draft(submission, caller, task, shape, estimate, now)
        request.priority = priority
        request.timeout_s = timeout_s
        request.fingerprint = fingerprint
        request.synchronous = synchronous
        need = need_of(request)
        if not self._router.fit.could_ever_fit(need):
            raise Unschedulable(
                "resources",
                f"needs {estimate.gpu_memory_mb} MiB on each of {need.gpu_count} GPU(s)"
                + (f" of type {need.gpu_type}" if need.gpu_type else "")
                + "; no worker of the fleet has that",
            )
        quotas = self._router.quotas
        quota = quotas.admit(
            caller.user,
            admin=caller.admin,
            priority=priority,
            memory_mb=estimate.gpu_memory_mb,
            gpu_seconds=gpu_seconds(request),
            queued=self._router.queued_count(caller.user),
            now=now,
            queue_retry_after_s=lambda: self._router.queue_retry_after(now),
        )
        quotas.check_room(self._router.queued_total(), lambda: self._router.queue_retry_after(now))
        quotas.record(quota, request.id, now)
        decisions = self._router.enqueue(request, now)
        return Admission(request, created=True, decisions=decisions)

    def _draft(
        self,
        submission: Submission,
        caller: Caller,
        task: Task,
        shape: Shape,
        estimate: Estimate,
        now: float,
    ) -> Request:
        return Request(
            id=self._ids.new("req", now),
            user=caller.user,
            model=submission.model,
            task=task,
            priority=submission.priority or self._settings.priorities.default,
            estimate=estimate,
            created_at=now,
            input=submission.input,
            shape=shape,
            resources=submission.resources,
            timeout_s=submission.timeout_s or self._settings.server.default_timeout_s,
            metadata=dict(submission.metadata),
            idempotency_key=submission.idempotency_key,
        )

    def _estimate(self, submission: Submission, task: Task) -> tuple[Shape, Estimate]:
        estimator = self._router.estimator
        shape = estimator.shape_of(submission.model, task, submission.input, submission.shape)
        return shape, estimator.estimate(submission.model, shape, submission.resources)

    def _validate(self, submission: Submission) -> tuple[Task, str, float]:
        """Check every field; return the effective task, priority and timeout."""
        profile = self._router.estimator.profile(submission.model)
        task = submission.task or profile.task
        if task not in profile.task.served():
            raise InvalidRequest(
                "task", f"model {submission.model!r} serves {profile.task.value}, not {task}"
            )
        priority = submission.priority or self._settings.priorities.default
        classes = self._settings.priorities.classes
        if priority not in classes:
            raise InvalidRequest(
                "priority", f"unknown priority {priority!r} (one of: {', '.join(classes)})"
            )
        server = self._settings.server
        timeout_s = (
            server.default_timeout_s if submission.timeout_s is None else submission.timeout_s
        )
        if not (math.isfinite(timeout_s) and 0 < timeout_s <= server.max_timeout_s):
            raise InvalidRequest(
                "timeout_s", f"must be more than 0 and at most {server.max_timeout_s:g} seconds"
            )
        self._validate_resources(submission.resources)
        self._validate_shape(submission.shape)
        self._validate_metadata(submission.metadata)
        key = submission.idempotency_key
        if key is not None and not (
            0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS and key.isprintable()
        ):
            raise InvalidRequest(
                "idempotency_key",
                f"must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
            )
        return task, priority, timeout_s

    @staticmethod
    def _validate_resources(resources: ResourceHints) -> None:
        if not 1 <= resources.gpu_count <= MAX_GPU_COUNT:
            raise InvalidRequest("resources.gpu_count", f"must be 1 to {MAX_GPU_COUNT}")
        memory = resources.gpu_memory_mb
        if memory is not None and not 1 <= memory <= MAX_GPU_MEMORY_MB:
            raise InvalidRequest("resources.gpu_memory_mb", f"must be 1 to {MAX_GPU_MEMORY_MB} MiB")

    @staticmethod
    def _validate_shape(shape: Shape | None) -> None:
        if shape is None:
            return
        if shape.batch_size < 1:
            raise InvalidRequest("shape.batch_size", "must be at least 1")
        if shape.input_tokens < 0 or shape.output_tokens < 0:
            raise InvalidRequest("shape", "token counts cannot be negative")

    @staticmethod
    def _validate_metadata(metadata: Mapping[str, str]) -> None:
        if len(metadata) > MAX_METADATA_KEYS:
            raise InvalidRequest("metadata", f"at most {MAX_METADATA_KEYS} labels")
        for key, value in metadata.items():
            if not isinstance(key, str) or not 0 < len(key) <= MAX_METADATA_KEY_CHARS:
                raise InvalidRequest(
                    "metadata", f"label names must be 1 to {MAX_METADATA_KEY_CHARS} characters"
                )
            if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_CHARS:
                raise InvalidRequest(
                    f"metadata.{key}",
                    f"values must be strings of {MAX_METADATA_VALUE_CHARS} characters at most",
                )

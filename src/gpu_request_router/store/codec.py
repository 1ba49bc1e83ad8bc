"""A lossless, versioned JSON encoding of :class:`Request` and :class:`Transition`.

Stores that keep records as text (the SQLite store's ``body`` columns, a Redis store's values)
share this one encoding, so it knows nothing of any particular store.

Every field is written, by name, into a JSON object that also carries the format version ``"v"``;
decoding refuses a version it does not know. A request is two such objects: the fields it is
created with (:data:`FIXED_FIELDS`, the prompt among them: written once) and those a status change
may change (:data:`STATE_FIELDS`: written on every change). Enums are written as their values,
``Placement.gpu_ids`` as a list (read back as a tuple), ``Estimate.duration_s``, ``input`` and
``metadata`` as objects (read back as plain dicts) and ``result`` as any JSON value. Floats keep
their exact value (``json`` writes the shortest repr that reads back bit for bit), including
``-0.0`` and the infinities (written as ``Infinity``, which Python's ``json`` reads back).

What is lossless is the request's JSON content: a tuple inside ``input`` or ``result`` comes back
as a list, as it would from any JSON API.
"""

from __future__ import annotations

import json
from typing import Any

from gpu_request_router.models.request import (
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    ResourceHints,
    Shape,
    Task,
    Transition,
)

__all__ = [
    "CODEC_VERSION",
    "FIXED_FIELDS",
    "STATE_FIELDS",
    "CodecError",
    "request_fixed_to_json",
    "request_from_json",
    "request_state_to_json",
    "transition_from_json",
    "transition_to_json",
]

CODEC_VERSION = 1
"""The format version written into every encoded record (key ``"v"``)."""


class CodecError(ValueError):
    """A text is not a record this codec wrote (malformed, or of an unknown format version)."""


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _loads(text: str | bytes, kind: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CodecError(f"not an encoded {kind}: {exc}") from exc
    if not isinstance(value, dict):
        raise CodecError(f"not an encoded {kind}: a JSON object was expected")
    version = value.get("v")
    if version != CODEC_VERSION:
        raise CodecError(
            f"encoded {kind} has format version {version!r}; this version reads {CODEC_VERSION}"
        )
    return value


# Requests ----------------------------------------------------------------------------------

FIXED_FIELDS = frozenset(
    {
        "id",
        "user",
        "model",
        "task",
        "priority",
        "created_at",
        "input",
        "shape",
        "resources",
        "timeout_s",
        "metadata",
        "idempotency_key",
        "fingerprint",
        "synchronous",
    }
)
"""The fields a request is created with and keeps (:func:`request_fixed_to_json`)."""

STATE_FIELDS = frozenset(
    {
        "estimate",
        "status",
        "queued_at",
        "dispatched_at",
        "started_at",
        "finished_at",
        "queue_wait_s",
        "attempts",
        "placement",
        "result",
        "error",
        "version",
    }
)
"""The fields a status change may change (:func:`request_state_to_json`); with
:data:`FIXED_FIELDS`, every field of :class:`Request`."""


def request_fixed_to_json(request: Request) -> str:
    """The fields of :data:`FIXED_FIELDS`, as one JSON object: written once, at creation.

    The prompt (``input``) is most of a request's size, so a store that writes this part once
    and :func:`request_state_to_json` on every status change encodes it once.
    """
    return _dumps(
        {
            "v": CODEC_VERSION,
            "id": request.id,
            "user": request.user,
            "model": request.model,
            "task": request.task.value,
            "priority": request.priority,
            "created_at": request.created_at,
            "input": dict(request.input),
            "shape": {
                "batch_size": request.shape.batch_size,
                "input_tokens": request.shape.input_tokens,
                "output_tokens": request.shape.output_tokens,
            },
            "resources": {
                "gpu_memory_mb": request.resources.gpu_memory_mb,
                "gpu_count": request.resources.gpu_count,
                "gpu_type": request.resources.gpu_type,
            },
            "timeout_s": request.timeout_s,
            "metadata": dict(request.metadata),
            "idempotency_key": request.idempotency_key,
            "fingerprint": request.fingerprint,
            "synchronous": request.synchronous,
        }
    )


def request_state_to_json(request: Request) -> str:
    """The fields of :data:`STATE_FIELDS`, as one JSON object: written on every status change."""
    estimate = request.estimate
    placement = request.placement
    error = request.error
    return _dumps(
        {
            "v": CODEC_VERSION,
            "estimate": {
                "gpu_memory_mb": estimate.gpu_memory_mb,
                "weights_mb": estimate.weights_mb,
                "kv_cache_mb": estimate.kv_cache_mb,
                "activations_mb": estimate.activations_mb,
                "duration_s": dict(estimate.duration_s),
                "gpu_count": estimate.gpu_count,
            },
            "status": request.status.value,
            "queued_at": request.queued_at,
            "dispatched_at": request.dispatched_at,
            "started_at": request.started_at,
            "finished_at": request.finished_at,
            "queue_wait_s": request.queue_wait_s,
            "attempts": request.attempts,
            "placement": None
            if placement is None
            else {
                "worker": placement.worker,
                "gpu_ids": list(placement.gpu_ids),
                "reason": placement.reason,
            },
            "result": request.result,
            "error": None if error is None else {"type": error.type, "message": error.message},
            "version": request.version,
        }
    )


def request_from_json(fixed: str | bytes, state: str | bytes | None = None) -> Request:
    """The request encoded as its two parts, or as one text holding every field (``state=None``).

    One text with every field is what the SQLite store's schema 2 wrote; it is the union of
    the two parts' objects.

    Raises:
        CodecError: a text is not an encoded request (part) of a known format version.
    """
    data = _loads(fixed, "request")
    if state is not None:
        data.update(_loads(state, "request state"))
    try:
        estimate = data["estimate"]
        shape = data["shape"]
        resources = data["resources"]
        placement = data["placement"]
        error = data["error"]
        queued_at = data["queued_at"]
        request = Request(
            id=data["id"],
            user=data["user"],
            model=data["model"],
            task=Task(data["task"]),
            priority=data["priority"],
            estimate=Estimate(
                gpu_memory_mb=estimate["gpu_memory_mb"],
                weights_mb=estimate["weights_mb"],
                kv_cache_mb=estimate["kv_cache_mb"],
                activations_mb=estimate["activations_mb"],
                duration_s=dict(estimate["duration_s"]),
                gpu_count=estimate["gpu_count"],
            ),
            created_at=data["created_at"],
            input=dict(data["input"]),
            shape=Shape(
                batch_size=shape["batch_size"],
                input_tokens=shape["input_tokens"],
                output_tokens=shape["output_tokens"],
            ),
            resources=ResourceHints(
                gpu_memory_mb=resources["gpu_memory_mb"],
                gpu_count=resources["gpu_count"],
                gpu_type=resources["gpu_type"],
            ),
            timeout_s=data["timeout_s"],
            metadata=dict(data["metadata"]),
            idempotency_key=data["idempotency_key"],
            fingerprint=data["fingerprint"],
            synchronous=data.get("synchronous", False),  # absent from rows written before it
            status=RequestStatus(data["status"]),
            dispatched_at=data["dispatched_at"],
            started_at=data["started_at"],
            finished_at=data["finished_at"],
            queue_wait_s=data["queue_wait_s"],
            attempts=data["attempts"],
            placement=None
            if placement is None
            else Placement(
                worker=placement["worker"],
                gpu_ids=tuple(placement["gpu_ids"]),
                reason=placement["reason"],
            ),
            result=data["result"],
            error=None
            if error is None
            else ErrorInfo(type=error["type"], message=error["message"]),
            version=data["version"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"malformed encoded request: {exc!r}") from exc
    # Set after construction: __post_init__ replaces a zero queued_at by created_at.
    request.queued_at = queued_at
    return request


# Transitions -------------------------------------------------------------------------------


def transition_to_json(transition: Transition) -> str:
    """The audit entry, every field of it, as one JSON object."""
    from_status = transition.from_status
    return _dumps(
        {
            "v": CODEC_VERSION,
            "request_id": transition.request_id,
            "seq": transition.seq,
            "from_status": None if from_status is None else from_status.value,
            "to_status": transition.to_status.value,
            "at": transition.at,
            "attempt": transition.attempt,
            "actor": transition.actor,
            "detail": transition.detail,
        }
    )


def transition_from_json(text: str | bytes) -> Transition:
    """The audit entry :func:`transition_to_json` encoded.

    Raises:
        CodecError: ``text`` is not an encoded transition of a known format version.
    """
    data = _loads(text, "transition")
    try:
        from_status = data["from_status"]
        return Transition(
            request_id=data["request_id"],
            seq=data["seq"],
            from_status=None if from_status is None else RequestStatus(from_status),
            to_status=RequestStatus(data["to_status"]),
            at=data["at"],
            attempt=data["attempt"],
            actor=data["actor"],
            detail=data["detail"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"malformed encoded transition: {exc!r}") from exc

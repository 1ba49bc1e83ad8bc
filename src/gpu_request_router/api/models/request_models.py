"""Wire schemas of requests: the submit body, the request as returned, the estimate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, with_config
from typing_extensions import TypedDict

from gpu_request_router.api.models.common import WireModel, whole_number
from gpu_request_router.core.request_receiver import EstimateReport, Submission
from gpu_request_router.http.timestamps import iso
from gpu_request_router.models.request import Request, ResourceHints, Shape, Task, Transition
from gpu_request_router.utils.json_values import repaired, repaired_text

__all__ = [
    "EstimateOut",
    "InputIn",
    "RequestOut",
    "SubmitBody",
    "TransitionOut",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$"
TaskName = Literal["chat", "completion", "embedding", "generic"]
LabelName = Annotated[str, Field(min_length=1, max_length=64)]
LabelValue = Annotated[str, Field(max_length=512)]


class ShapeIn(WireModel):
    """The size of the request; counted from ``input`` when absent."""

    batch_size: int = Field(1, ge=1, le=4096, description="Sequences processed together.")
    input_tokens: int = Field(0, ge=0, le=10_000_000, description="Prompt tokens per sequence.")
    output_tokens: int = Field(0, ge=0, le=10_000_000, description="New tokens per sequence.")


class ResourcesIn(WireModel):
    """What the client says about resources."""

    gpu_memory_mb: int | None = Field(
        None, ge=1, le=16 * 1024 * 1024, description="Memory per GPU (MiB); never below weights."
    )
    gpu_count: int = Field(1, ge=1, le=64, description="GPUs taken together on one worker.")
    gpu_type: str | None = Field(None, pattern=_NAME, description="Only GPUs of this type.")


TokenLimit = Annotated[
    int | None,
    Field(ge=1, le=10_000_000, description="New tokens at most (as OpenAI's API)."),
    BeforeValidator(whole_number),
]


@with_config(ConfigDict(strict=True, extra="allow"))
class InputIn(TypedDict, total=False):
    """The input, forwarded to the backend as it is; the router reads the fields declared here.

    ``max_tokens`` and ``max_completion_tokens`` follow one rule on every route: an integer
    from 1 to 10,000,000 (or null: the model's default).
    """

    max_tokens: TokenLimit
    max_completion_tokens: TokenLimit


class SubmitBody(WireModel):
    """A request to run on the fleet (also the body of the estimate dry run)."""

    model: str = Field(pattern=_NAME, description="A model of the catalog.")
    task: TaskName | None = Field(None, description="Default: the model's task.")
    input: InputIn = Field(
        default_factory=lambda: InputIn(),
        description="Forwarded to the backend (e.g. OpenAI messages).",
    )
    shape: ShapeIn | None = None
    priority: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    resources: ResourcesIn | None = None
    timeout_s: float | None = Field(None, gt=0, description="Expire if not finished by then.")
    metadata: dict[LabelName, LabelValue] = Field(
        default_factory=dict, max_length=32, description="Labels (at most 32)."
    )

    def to_submission(self, idempotency_key: str | None) -> Submission:
        """The domain form of this body."""
        resources = self.resources or ResourcesIn()
        return Submission(
            model=self.model,
            task=Task(self.task) if self.task is not None else None,
            input=dict(self.input),
            shape=(
                Shape(self.shape.batch_size, self.shape.input_tokens, self.shape.output_tokens)
                if self.shape is not None
                else None
            ),
            priority=self.priority,
            resources=ResourceHints(
                gpu_memory_mb=resources.gpu_memory_mb,
                gpu_count=resources.gpu_count,
                gpu_type=resources.gpu_type,
            ),
            timeout_s=self.timeout_s,
            metadata=dict(self.metadata),
            idempotency_key=idempotency_key,
        )


class PlacementOut(BaseModel):
    """Where the request runs (or ran last)."""

    worker: str
    gpu_id: str
    gpu_ids: list[str]
    reason: str = Field(description="Why the policy chose these GPUs.")


class EstimateBrief(BaseModel):
    """The current estimate: memory per GPU and expected duration."""

    gpu_memory_mb: int
    duration_s: float


class ErrorOut(BaseModel):
    """Why the request failed (or why its last attempt did)."""

    type: str
    message: str


class ShapeOut(BaseModel):
    """The size the estimate is based on."""

    batch_size: int
    input_tokens: int
    output_tokens: int


class RequestOut(BaseModel):
    """A request and everything known about it."""

    id: str
    user: str
    model: str
    task: TaskName
    priority: str
    status: Literal[
        "queued", "dispatching", "running", "succeeded", "failed", "cancelled", "expired"
    ]
    created_at: str = Field(description="ISO 8601 UTC.")
    dispatched_at: str | None
    started_at: str | None
    finished_at: str | None
    timeout_s: float
    queue_wait_s: float
    attempts: int
    placement: PlacementOut | None
    estimate: EstimateBrief
    shape: ShapeOut
    result: Any = None
    error: ErrorOut | None
    metadata: dict[str, str]
    queue_position: int | None = Field(
        None,
        description="While queued: how many requests go before it (0: next); null when it is "
        "not queued or more than 1,000 are ahead.",
    )

    @classmethod
    def of(
        cls, request: Request, *, gpu_type: str | None, queue_position: int | None
    ) -> RequestOut:
        """The wire form of a request; ``gpu_type`` is that of its placement, if any.

        What an older version stored unchecked is repaired so that it can be sent
        (:func:`~gpu_request_router.utils.json_values.repaired`): a read never fails on it.
        """
        placement = request.placement
        estimate = request.estimate
        duration = (
            estimate.duration_on(gpu_type) if gpu_type is not None else estimate.typical_duration_s
        )
        return cls(
            id=request.id,
            user=request.user,
            model=request.model,
            task=request.task.value,
            priority=request.priority,
            status=request.status.value,
            created_at=iso(request.created_at) or "",
            dispatched_at=iso(request.dispatched_at),
            started_at=iso(request.started_at),
            finished_at=iso(request.finished_at),
            timeout_s=request.timeout_s,
            queue_wait_s=round(request.queue_wait_s, 6),
            attempts=request.attempts,
            placement=(
                PlacementOut(
                    worker=placement.worker,
                    gpu_id=placement.gpu_id,
                    gpu_ids=list(placement.gpu_ids),
                    reason=placement.reason,
                )
                if placement is not None
                else None
            ),
            estimate=EstimateBrief(
                gpu_memory_mb=estimate.gpu_memory_mb, duration_s=round(duration, 6)
            ),
            shape=ShapeOut(
                batch_size=request.shape.batch_size,
                input_tokens=request.shape.input_tokens,
                output_tokens=request.shape.output_tokens,
            ),
            result=repaired(request.result),
            error=(
                ErrorOut(type=request.error.type, message=repaired_text(request.error.message))
                if request.error is not None
                else None
            ),
            metadata={repaired_text(k): repaired_text(v) for k, v in request.metadata.items()},
            queue_position=queue_position,
        )


class BreakdownOut(BaseModel):
    """What the memory estimate is made of, per GPU (MiB)."""

    weights_mb: int
    kv_cache_mb: int
    activations_mb: int


class EstimateOut(BaseModel):
    """The dry run's answer: what the request needs and which GPUs could take it now."""

    model: str
    gpu_memory_mb: int = Field(description="Peak memory per GPU (MiB).")
    gpu_count: int
    duration_s: dict[str, float] = Field(description="Expected duration per GPU type.")
    breakdown: BreakdownOut
    shape: ShapeOut
    fits_now: list[str] = Field(description="GPUs that could take it right now.")

    @classmethod
    def of(cls, model: str, report: EstimateReport) -> EstimateOut:
        """The wire form of an estimate report."""
        estimate = report.estimate
        return cls(
            model=model,
            gpu_memory_mb=estimate.gpu_memory_mb,
            gpu_count=estimate.gpu_count,
            duration_s={kind: round(s, 6) for kind, s in estimate.duration_s.items()},
            breakdown=BreakdownOut(
                weights_mb=estimate.weights_mb,
                kv_cache_mb=estimate.kv_cache_mb,
                activations_mb=estimate.activations_mb,
            ),
            shape=ShapeOut(
                batch_size=report.shape.batch_size,
                input_tokens=report.shape.input_tokens,
                output_tokens=report.shape.output_tokens,
            ),
            fits_now=report.fits_now,
        )


class TransitionOut(BaseModel):
    """One status change of a request (an SSE event and an audit-trail entry)."""

    request_id: str
    seq: int
    from_status: str | None
    status: str
    at: str
    attempt: int
    actor: str
    detail: str

    @classmethod
    def of(cls, change: Transition) -> TransitionOut:
        """The wire form of an audit-trail entry."""
        return cls(
            request_id=change.request_id,
            seq=change.seq,
            from_status=change.from_status.value if change.from_status is not None else None,
            status=change.to_status.value,
            at=iso(change.at) or "",
            attempt=change.attempt,
            actor=repaired_text(change.actor),
            detail=repaired_text(change.detail),
        )

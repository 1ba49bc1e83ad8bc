"""Wire schema of ``GET /v1/requests/{id}/explain``: where and why, or why it still waits."""

from __future__ import annotations

from pydantic import BaseModel, Field

from gpu_request_router.core.explain import Explanation
from gpu_request_router.http.timestamps import iso

__all__ = ["CandidateOut", "ExplainOut", "ExplainPlacementOut", "WaitingOut"]


class ExplainPlacementOut(BaseModel):
    """Where the request was placed (its first GPU)."""

    worker: str
    gpu_id: str


class CandidateOut(BaseModel):
    """A candidate GPU the policy weighed (the first GPU of a multi-GPU group)."""

    gpu_id: str
    worker: str
    type: str
    chosen: bool
    score: dict[str, float] = Field(
        description="The parts of the policy's ranking key by name (lower key ranks first); "
        "empty where the policy did not rank (random, round_robin)."
    )
    note: str


class WaitingOut(BaseModel):
    """Why a queued request waits, where it stands, and when it is expected to start."""

    blocked_by: str = Field(
        description="memory | slots | quota | priority | starvation_hold | no_gpu | retry_backoff"
    )
    detail: str
    queue_position: int | None = Field(
        description="How many queued requests go before it (0: next); null while it backs off "
        "before a retry or when more than 1,000 are ahead."
    )
    eta_s: float | None = Field(
        description="Seconds until it is expected to start, projected from the router's "
        "estimates; null when no projection can be made."
    )


class ExplainOut(BaseModel):
    """Where the request was placed and why, or why it still waits."""

    id: str
    status: str
    summary: str = Field(description="One plain sentence.")
    placement: ExplainPlacementOut | None
    reason: str | None = Field(description="The placement reason the router recorded.")
    policy: str | None
    candidates: list[CandidateOut] = Field(
        description="What the policy weighed, best first (at most 8); empty when not placed, "
        "or when the decision is no longer kept (after a restart, or 4,096 dispatches later)."
    )
    waiting: WaitingOut | None
    decided_at: str | None = Field(description="When the placement was decided (ISO 8601 UTC).")

    @classmethod
    def of(cls, explanation: Explanation) -> ExplainOut:
        """The wire form of an explanation."""
        waiting = explanation.waiting
        return cls(
            id=explanation.id,
            status=explanation.status,
            summary=explanation.summary,
            placement=(
                ExplainPlacementOut(worker=explanation.worker, gpu_id=explanation.gpu_id)
                if explanation.worker is not None and explanation.gpu_id is not None
                else None
            ),
            reason=explanation.reason,
            policy=explanation.policy,
            candidates=[
                CandidateOut(
                    gpu_id=c.gpu_id,
                    worker=c.worker,
                    type=c.type,
                    chosen=c.chosen,
                    score=dict(c.score),
                    note=c.note,
                )
                for c in explanation.candidates
            ],
            waiting=(
                WaitingOut(
                    blocked_by=waiting.blocked_by,
                    detail=waiting.detail,
                    queue_position=waiting.queue_position,
                    eta_s=None if waiting.eta_s is None else round(waiting.eta_s, 3),
                )
                if waiting is not None
                else None
            ),
            decided_at=iso(explanation.decided_at),
        )

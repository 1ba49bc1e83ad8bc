"""How a GPU serves work: the slowdown of sharing it, and the cost of loading a model.

One model, used twice: the ``balanced`` policy ranks GPUs by the finish time it predicts with
it, and the simulated fleet (``bench replay``, the ``simulated`` backend) runs executions by it.

- **Speed per GPU type** is the estimator's: a request's duration on each type
  (:attr:`~gpu_request_router.models.request.Estimate.duration_s`), from the catalog's measured
  throughput or the type's datasheet roofline.
- **Sharing** (processor sharing): an execution that shares its GPU with ``n − 1`` others runs
  ``1 + α·(n − 1)`` times slower than alone. An inference server batches (chat, completion,
  embedding): its step time grows slowly with the batch, α = ``batch_slowdown``. Separate jobs
  (``generic``) are time-sliced: they take turns, α = ``job_slowdown`` = 1, so the GPU's total
  throughput stays that of one job.
- **Cold start**: a model whose weights are not resident on the GPU is loaded first, taking
  the weights' size divided by ``load_gb_s``.

The default constants and their sources are in docs/benchmarks.md ("The service model").
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_request_router.config.config_loader import ServiceSettings
from gpu_request_router.models.request import Task

__all__ = ["ServiceModel"]

_BYTES_PER_MB = 2**20


@dataclass(frozen=True, slots=True)
class ServiceModel:
    """The slowdown of sharing a GPU and the bandwidth of loading weights (module docstring)."""

    batch_slowdown: float
    job_slowdown: float
    load_gb_s: float

    @classmethod
    def of(cls, section: ServiceSettings | None = None) -> ServiceModel:
        """The model a ``placement.service`` section describes (default: the configuration's)."""
        section = section or ServiceSettings()
        return cls(section.batch_slowdown, section.job_slowdown, section.load_gb_s)

    def slowdown(self, task: Task, sharing: float) -> float:
        """How many times slower than alone an execution of ``task`` runs among ``sharing``.

        ``sharing`` counts the executions on the GPU, this one included (a router that knows a
        GPU's load only as a share of its slots may pass a fraction).
        """
        alpha = self.job_slowdown if task is Task.GENERIC else self.batch_slowdown
        return 1.0 + alpha * max(0, sharing - 1)

    def load_s(self, weights_mb: int) -> float:
        """Seconds to load ``weights_mb`` of weights onto a GPU."""
        return weights_mb * _BYTES_PER_MB / (self.load_gb_s * 1e9)

"""GPUs: a reading from a monitoring source, and the router's live view of one GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["GPUHealth", "GPUReading", "GPUState", "gpu_id_for"]


class GPUHealth(StrEnum):
    """How fit a GPU is for work. Only ``healthy`` and ``degraded`` GPUs take new work."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


def gpu_id_for(worker: str, index: int) -> str:
    """The stable GPU id ``<worker>:<index>`` (one URL path segment)."""
    return f"{worker}:{index}"


@dataclass(frozen=True, slots=True)
class GPUReading:
    """One observation of one GPU by a monitoring source.

    ``memory_used_mb`` is what the device reports in use (by anyone); ``memory_reserved_mb`` is
    the part the reporting worker attributes to the router's own executions (0 for sources that
    cannot tell, such as plain NVML or dcgm-exporter). ``backend`` is the configured backend the
    GPU belongs to. ``load`` (0..1) is how busy the backend says it is (an inference server's
    KV-cache usage), where it says. ``running`` lists the router's executions the reading saw
    on the GPU (a worker says; ``None`` for sources that cannot tell). ``reported_id`` is the id
    a ``gpurouter worker`` itself gives the GPU (``<its own name>:<index>``), which the router
    sends back when it names the GPU to that worker; the router's own id is always
    ``<worker>:<index>`` (``None`` for sources that are not workers). ``models_loaded`` are the
    models whose weights are resident and counted in ``memory_used_mb`` (pinned, or in use);
    ``models_cached`` those whose weights stay resident without use and are not counted: the
    backend frees them, least recently used first, when a load needs the room, and a request
    for one of them starts without loading. Fields a device does not support are ``None``.
    """

    worker: str
    index: int
    type: str
    memory_total_mb: int
    memory_used_mb: int = 0
    memory_reserved_mb: int = 0
    backend: str = ""
    name: str = ""
    uuid: str | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    health: GPUHealth = GPUHealth.HEALTHY
    ecc_uncorrected: int = 0
    slots: int = 8
    models: tuple[str, ...] = ("*",)
    models_loaded: tuple[str, ...] = ()
    models_cached: tuple[str, ...] = ()
    load: float | None = None
    running: tuple[str, ...] | None = None
    reported_id: str | None = None

    @property
    def gpu_id(self) -> str:
        """The stable id of the GPU this reading is about."""
        return gpu_id_for(self.worker, self.index)

    @property
    def external_used_mb(self) -> int:
        """Memory in use that is not the router's own executions (never negative)."""
        return max(0, self.memory_used_mb - self.memory_reserved_mb)


@dataclass(slots=True, eq=False)
class GPUState:
    """The router's live view of one GPU: the latest reading plus router-side state.

    ``running`` maps each execution placed here to the memory reserved for it. ``room_mb``
    (memory free for placement: total − safety margin − router reservations − memory used by
    others), ``free_slots``, ``busy`` (0..1: the share of slots in use, or the backend's own
    load where that is higher) and ``schedulable`` are kept current by the GPU state monitor so
    that placement reads plain attributes. ``unseen`` holds the executions placed after the
    latest reading was taken (by the monitor's sequence number of their placement);
    ``hidden_mb`` is memory in use that the latest reading hid, the sum of ``hidden`` (sequence
    number, MiB, execution; see :meth:`GPUStateMonitor.release`). ``elsewhere_mb`` and
    ``elsewhere_slots`` are the memory and slots other routers sharing the state store hold
    here (:meth:`GPUStateMonitor.elsewhere`); ``aside_mb`` and ``aside_slots`` what a
    placement pass keeps for another router's better-ranked request (only during the pass).
    ``id`` (``<worker>:<index>``) is fixed at creation.
    """

    reading: GPUReading
    last_seen: float
    health: GPUHealth = GPUHealth.HEALTHY
    cordoned: bool = False
    draining: bool = False
    reserved_mb: int = 0
    running: dict[str, int] = field(default_factory=dict)
    room_mb: int = 0
    free_slots: int = 0
    schedulable: bool = False
    circuit_open: bool = False
    busy: float = 0.0
    unseen: dict[str, int] = field(default_factory=dict)
    hidden: list[tuple[int, int, str]] = field(default_factory=list)
    hidden_mb: int = 0
    elsewhere_mb: int = 0
    elsewhere_slots: int = 0
    aside_mb: int = 0
    aside_slots: int = 0
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.reading.gpu_id

    @property
    def worker(self) -> str:
        """The worker (host) the GPU belongs to."""
        return self.reading.worker

    @property
    def type(self) -> str:
        """The GPU type, e.g. ``H100-80GB``."""
        return self.reading.type

    @property
    def index(self) -> int:
        """The GPU's index on its worker."""
        return self.reading.index

    @property
    def memory_total_mb(self) -> int:
        """Total device memory (MiB)."""
        return self.reading.memory_total_mb

    @property
    def slots(self) -> int:
        """How many executions the GPU takes at once."""
        return self.reading.slots

    def serves(self, model: str) -> bool:
        """Whether the backend behind this GPU serves (or can load) ``model``."""
        models = self.reading.models
        return "*" in models or model in models

    def has_loaded(self, model: str) -> bool:
        """Whether ``model``'s weights are resident on the GPU and counted as used already."""
        return model in self.reading.models_loaded

    def holds(self, model: str) -> bool:
        """Whether ``model``'s weights are on the GPU (loaded or cached): no load to wait for."""
        reading = self.reading
        return model in reading.models_loaded or model in reading.models_cached

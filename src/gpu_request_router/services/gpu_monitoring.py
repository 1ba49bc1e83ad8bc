"""GPU monitoring sources: where readings come from (SPEC §4 GPU Monitoring System integration).

A source reads the GPUs of one worker and returns a complete report; the router's GPU state
monitor turns readings into health and room. The sources:

- :class:`SimulatedSource` reads an in-process
  :class:`~gpu_request_router.services.simulator.SimulatedFleet`;
- :class:`NvmlSource` reads the GPUs of the router's own host through NVML
  (:class:`~gpu_request_router.worker.nvml.NvmlReader`, run in a thread);
- :class:`DcgmSource` reads a host's NVIDIA dcgm-exporter over HTTP (the ``dcgm_url`` of an
  ``openai`` backend) and parses its Prometheus text with :func:`parse_dcgm`;
- :class:`AgentSource` reads a ``gpurouter worker`` host (``GET /v1/gpus``);
- :class:`OpenAIBackendSource` gives the GPU of an ``openai`` backend (an inference server).

**dcgm-exporter's metrics** (gauges, labelled ``gpu`` = index, ``UUID``, ``modelName``,
``Hostname``): ``DCGM_FI_DEV_FB_USED``, ``DCGM_FI_DEV_FB_FREE`` and, where the exporter has it,
``DCGM_FI_DEV_FB_RESERVED`` (MiB; total = used + free + reserved, and the reading's used memory
is used + reserved, as NVML's: the memory nobody else can allocate); ``DCGM_FI_DEV_GPU_UTIL``
(%), ``DCGM_FI_DEV_GPU_TEMP`` (°C), ``DCGM_FI_DEV_POWER_USAGE`` (W);
``DCGM_FI_DEV_XID_ERRORS`` (the value of the last Xid error: any nonzero value makes the GPU
``unhealthy``: it is sticky, so an application-caused Xid such as 13 or 43 marks the GPU too, until
the exporter is restarted); ``DCGM_FI_DEV_ECC_DBE_VOL_TOTAL`` (uncorrected volatile ECC errors,
reported as ``ecc_uncorrected``, which the monitor turns into ``unhealthy``). A metric that is
missing, or that carries DCGM's "blank" sentinel (a value of 2⁴⁷ or more: not supported, not
found), leaves its field ``None``. Series of MIG instances (a ``GPU_I_ID`` label) are ignored.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.utils.json_values import first_problem
from gpu_request_router.worker.nvml import UNKNOWN_GPU_TYPE, NvmlReader, gpu_type_name

__all__ = [
    "AgentSource",
    "DcgmSource",
    "GpuSource",
    "NvmlSource",
    "OpenAIBackendSource",
    "SimulatedSource",
    "parse_dcgm",
    "reading_from_worker",
]


class GpuSource(Protocol):
    """Reads all GPUs of one worker."""

    worker: str

    async def read(self) -> list[GPUReading]:
        """A complete report of the worker's GPUs; raises when the worker cannot be read."""
        ...


class SimulatedSource:
    """Readings of one simulated worker."""

    def __init__(self, fleet: SimulatedFleet, worker: str) -> None:
        self.worker = worker
        self._fleet = fleet

    async def read(self) -> list[GPUReading]:
        """The simulated worker's GPUs as they are now."""
        return self._fleet.readings(self.worker)


class NvmlSource:
    """Readings of the GPUs on the router's own host, through NVML (the reader runs in a thread)."""

    def __init__(self, reader: NvmlReader) -> None:
        self.worker = reader.worker
        self._reader = reader

    async def read(self) -> list[GPUReading]:
        """The host's GPUs as NVML reports them now."""
        return await asyncio.to_thread(self._reader.read)


# dcgm-exporter ------------------------------------------------------------------------------------

_DCGM_FIELDS = {
    "DCGM_FI_DEV_FB_USED": "used",
    "DCGM_FI_DEV_FB_FREE": "free",
    "DCGM_FI_DEV_FB_RESERVED": "reserved",
    "DCGM_FI_DEV_GPU_UTIL": "utilization",
    "DCGM_FI_DEV_GPU_TEMP": "temperature",
    "DCGM_FI_DEV_POWER_USAGE": "power",
    "DCGM_FI_DEV_XID_ERRORS": "xid",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "ecc_dbe",
}
# DCGM marks values it does not have with sentinels at or above 2**47 (DCGM_FP64_BLANK) and
# 0x7ffffffffffffff0 (DCGM_INT64_BLANK): never a real figure for these fields.
_DCGM_BLANK = float(2**47)


def parse_dcgm(
    text: str,
    worker: str,
    *,
    gpu_type: str | None = None,
    memory_total_mb: int | None = None,
    slots: int = 8,
    backend: str = "",
    models: Sequence[str] = ("*",),
    models_loaded: Sequence[str] = (),
) -> list[GPUReading]:
    """The readings in dcgm-exporter's Prometheus text, one per ``gpu`` label, by index.

    ``gpu_type`` names the router type of every GPU (else :func:`gpu_type_name` of the
    ``modelName`` label and the total memory); ``memory_total_mb`` overrides the total the memory
    metrics add up to. A GPU whose total memory cannot be told is reported ``unknown`` with a total
    of 0 (never placed on).

    Raises:
        ValueError: the text is not Prometheus exposition format.
    """
    values: dict[int, dict[str, float]] = {}
    labels: dict[int, dict[str, str]] = {}
    for family in text_string_to_metric_families(text):
        field = _DCGM_FIELDS.get(family.name)
        if field is None:
            continue
        # The parser names a counter's samples "<family>_total".
        for sample in family.samples:
            index = _gpu_index(sample.labels.get("gpu"))
            if sample.name not in (family.name, f"{family.name}_total") or index is None:
                continue
            if sample.labels.get("GPU_I_ID"):
                continue
            gpu_labels = labels.setdefault(index, {})
            for key, label in sample.labels.items():
                if label:
                    gpu_labels.setdefault(key, label)
            value = float(sample.value)
            if math.isfinite(value) and 0 <= value < _DCGM_BLANK:
                values.setdefault(index, {})[field] = value
    return [
        _dcgm_reading(
            index,
            values.get(index, {}),
            labels[index],
            worker=worker,
            gpu_type=gpu_type,
            memory_total_mb=memory_total_mb,
            slots=slots,
            backend=backend,
            models=tuple(models),
            models_loaded=tuple(models_loaded),
        )
        for index in sorted(labels)
    ]


def _gpu_index(label: str | None) -> int | None:
    return int(label) if label is not None and label.isdigit() else None


def _dcgm_reading(
    index: int,
    values: dict[str, float],
    labels: dict[str, str],
    *,
    worker: str,
    gpu_type: str | None,
    memory_total_mb: int | None,
    slots: int,
    backend: str,
    models: tuple[str, ...],
    models_loaded: tuple[str, ...],
) -> GPUReading:
    used, free, reserved = (values.get(key) for key in ("used", "free", "reserved"))
    total: int | None = memory_total_mb
    if total is None and used is not None and free is not None:
        total = round(used + free + (reserved or 0))
    if total is None and gpu_type in BUILTIN_GPU_TYPES:
        total = BUILTIN_GPU_TYPES[gpu_type].memory_mb
    if used is not None:
        used_mb = math.ceil(used + (reserved or 0))
    elif free is not None and total is not None:
        used_mb = max(0, total - math.floor(free))
    else:
        used_mb = 0
    name = labels.get("modelName", "")
    if gpu_type is None:
        gpu_type = gpu_type_name(name, total) if total is not None else UNKNOWN_GPU_TYPE
    health = GPUHealth.HEALTHY
    if total is None:
        health = GPUHealth.UNKNOWN
    if values.get("xid", 0) > 0:
        health = GPUHealth.UNHEALTHY
    return GPUReading(
        worker=worker,
        index=index,
        type=gpu_type,
        memory_total_mb=total or 0,
        memory_used_mb=min(used_mb, total) if total is not None else used_mb,
        backend=backend,
        name=name,
        uuid=labels.get("UUID"),
        utilization_pct=values.get("utilization"),
        temperature_c=values.get("temperature"),
        power_w=values.get("power"),
        health=health,
        ecc_uncorrected=int(values.get("ecc_dbe", 0)),
        slots=slots,
        models=models,
        models_loaded=models_loaded,
    )


class DcgmSource:
    """Readings of one worker's GPUs from its dcgm-exporter (``GET <url>``, Prometheus text).

    An HTTP error status, a timeout (``timeout_s``) or an unreachable exporter raises
    (:class:`httpx.HTTPError`), which the router counts as the worker not answering. ``client``
    is used as given (and left open); without one the source makes its own, closed by
    :meth:`aclose`. The other keywords go to :func:`parse_dcgm`.
    """

    def __init__(
        self,
        url: str,
        worker: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 5.0,
        gpu_type: str | None = None,
        memory_total_mb: int | None = None,
        slots: int = 8,
        backend: str = "",
        models: Sequence[str] = ("*",),
        models_loaded: Sequence[str] = (),
    ) -> None:
        self.url = url
        self.worker = worker
        self._client = client
        self._own_client = client is None
        self._timeout = httpx.Timeout(timeout_s)
        self._gpu_type = gpu_type
        self._memory_total_mb = memory_total_mb
        self._slots = slots
        self._backend = backend
        self._models = tuple(models)
        self._models_loaded = tuple(models_loaded)

    async def read(self) -> list[GPUReading]:
        """The worker's GPUs as its exporter reports them now.

        Raises:
            httpx.HTTPError: the exporter did not answer, or answered with an error status.
            ValueError: the answer is not Prometheus text.
        """
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        response = await self._client.get(self.url, timeout=self._timeout)
        response.raise_for_status()
        try:
            return parse_dcgm(
                response.text,
                self.worker,
                gpu_type=self._gpu_type,
                memory_total_mb=self._memory_total_mb,
                slots=self._slots,
                backend=self._backend,
                models=self._models,
                models_loaded=self._models_loaded,
            )
        except ValueError as exc:
            raise ValueError(f"{self.url} did not answer with Prometheus text: {exc}") from exc

    async def aclose(self) -> None:
        """Close the HTTP client if the source made it."""
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None


# The longest GPU id a worker may report (its name, at most 128 characters, ':' and an index).
_MAX_ID_CHARS = 256


def reading_from_worker(item: Mapping[str, Any], worker: str, backend: str) -> GPUReading:
    """A reading from one GPU of a worker's ``GET /v1/gpus`` (the worker protocol).

    The router names the GPU ``<worker>:<index>`` (``worker`` as the router knows it: the
    backend's name, or the name the worker registered with) and keeps the worker's own ``id`` as
    :attr:`~GPUReading.reported_id`, the id it sends back when it places work there.

    A reading holding a value the router could not send back as JSON (a lone surrogate in a
    name, say: :mod:`~gpu_request_router.utils.json_values`) is malformed too, so that no reading
    can break ``GET /v1/gpus``.

    Raises:
        ValueError: the item is not a well-formed GPU reading.
    """
    try:
        problem = first_problem(dict(item))
        if problem is not None:
            raise TypeError(problem.at("reading"))
        index = item["index"]
        reported = item["id"]
        if not isinstance(reported, str) or not 0 < len(reported) <= _MAX_ID_CHARS:
            raise TypeError(f"id must be a string of 1 to {_MAX_ID_CHARS} characters")
        total = item["memory_total_mb"]
        used = item.get("memory_used_mb") or 0
        reserved = item.get("memory_reserved_mb") or 0
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, total, used)):
            raise TypeError("index and memory figures must be integers")
        if not isinstance(reserved, int) or index < 0 or total <= 0:
            raise TypeError("negative index or no memory")
        health = GPUHealth(item.get("health", "healthy"))
        models = tuple(str(m) for m in item.get("models") or ("*",))
        loaded = tuple(str(m) for m in item.get("models_loaded") or ())
        cached = tuple(str(m) for m in item.get("models_cached") or ())
        running = item.get("running")
        if running is not None and not (
            isinstance(running, list) and all(isinstance(e, str) for e in running)
        ):
            raise TypeError("running must be a list of execution ids")
        return GPUReading(
            worker=worker,
            index=index,
            type=str(item.get("type") or UNKNOWN_GPU_TYPE),
            memory_total_mb=total,
            memory_used_mb=used,
            memory_reserved_mb=reserved,
            backend=backend,
            name=str(item.get("name") or ""),
            uuid=str(item["uuid"]) if item.get("uuid") else None,
            utilization_pct=_float(item.get("utilization_pct")),
            temperature_c=_float(item.get("temperature_c")),
            power_w=_float(item.get("power_w")),
            health=health,
            ecc_uncorrected=int(item.get("ecc_uncorrected") or 0),
            slots=int(item.get("slots") or 8),
            models=models,
            models_loaded=loaded,
            models_cached=cached,
            running=tuple(running) if running is not None else None,
            reported_id=reported,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"worker {worker} sent a malformed GPU reading: {exc}") from exc


def _float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


class AgentSource:
    """Readings of a ``gpurouter worker`` host: ``GET <url>/v1/gpus`` (the worker protocol).

    Any failure (refused, timeout, error status, malformed answer) raises, which the router
    counts as the worker not answering.
    """

    def __init__(
        self, url: str, worker: str, token: str | None = None, *, timeout_s: float = 5.0
    ) -> None:
        self.url = url.rstrip("/")
        self.worker = worker
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))

    async def read(self) -> list[GPUReading]:
        """The worker's GPUs as it reports them now."""
        return self.parse(await self.read_items())

    async def read_items(self) -> list[Any]:
        """The worker's ``GET /v1/gpus`` items as it sent them (:meth:`parse` reads them)."""
        response = await self._client.get(f"{self.url}/v1/gpus")
        response.raise_for_status()
        answer = response.json()
        items = answer.get("items") if isinstance(answer, dict) else None
        if not isinstance(items, list):
            raise ValueError(f"worker {self.worker} sent no GPU list")
        return items

    def parse(self, items: list[Any]) -> list[GPUReading]:
        """Readings from the worker's items (this router's read, or another's shared one).

        Raises:
            ValueError: an item is not a well-formed GPU reading.
        """
        return [reading_from_worker(item, self.worker, self.worker) for item in items]

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class OpenAIBackendSource:
    """The one GPU of an ``openai`` backend: its configured type, live memory and load.

    An inference server keeps its models' weights resident and hands out its KV-cache pool
    itself, so the router treats the server's memory beyond the weights as its own to reserve:
    the reading's memory used by others is the resident weights. With a ``dcgm`` source the
    device's live figures (used memory, utilisation, temperature, health) come from
    dcgm-exporter (``dcgm_gpu`` picks the GPU); with a ``load`` callable the server's own load
    (vLLM's KV-cache usage, 0..1) is read too. A failing dcgm-exporter or server raises.
    """

    def __init__(
        self,
        name: str,
        gpu_type: str,
        memory_total_mb: int,
        *,
        slots: int,
        models: Sequence[str],
        weights_mb: int,
        dcgm: DcgmSource | None = None,
        dcgm_gpu: int = 0,
        load: Callable[[], Awaitable[float | None]] | None = None,
    ) -> None:
        self.worker = name
        self._gpu_type = gpu_type
        self._total = memory_total_mb
        self._slots = slots
        self._models = tuple(models)
        self._weights = weights_mb
        self._dcgm = dcgm
        self._dcgm_gpu = dcgm_gpu
        self._load = load

    async def read(self) -> list[GPUReading]:
        """The backend's GPU now."""
        live: GPUReading | None = None
        if self._dcgm is not None:
            readings = await self._dcgm.read()
            live = next((r for r in readings if r.index == self._dcgm_gpu), None)
            if live is None:
                raise ValueError(f"dcgm-exporter has no GPU {self._dcgm_gpu}")
        load = await self._load() if self._load is not None else None
        used = live.memory_used_mb if live is not None else self._weights
        loaded = tuple(m for m in self._models if m != "*")
        return [
            GPUReading(
                worker=self.worker,
                index=0,
                type=self._gpu_type,
                memory_total_mb=self._total,
                memory_used_mb=used,
                memory_reserved_mb=max(0, used - self._weights),
                backend=self.worker,
                name=live.name if live is not None else self._gpu_type,
                uuid=live.uuid if live is not None else None,
                utilization_pct=live.utilization_pct if live is not None else None,
                temperature_c=live.temperature_c if live is not None else None,
                power_w=live.power_w if live is not None else None,
                health=live.health if live is not None else GPUHealth.HEALTHY,
                ecc_uncorrected=live.ecc_uncorrected if live is not None else 0,
                slots=self._slots,
                models=self._models,
                models_loaded=loaded,
                load=load,
            )
        ]

    async def aclose(self) -> None:
        """Close the dcgm source's client."""
        if self._dcgm is not None:
            await self._dcgm.aclose()

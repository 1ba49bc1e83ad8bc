"""Reading this host's NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, ``import pynvml``).

:class:`NvmlReader` is the :class:`~gpu_request_router.worker.readers.GpuReader` of a real GPU
host. Every :meth:`~NvmlReader.read` asks NVML afresh for the device count and for each device's
handle (handles are never kept across reads, so a device that failed once is read normally as soon
as NVML answers again), then for the fields of a :class:`GPUReading`.

**Errors, per field.** A field NVML cannot give (``NVMLError_NotSupported``, or any other error
that is about that one query, e.g. fan speed and retired pages on an H200) is left ``None``
(``0`` for the uncorrected ECC count). An error that says the *device* is gone
(``GpuIsLost``, ``ResetRequired``, ``Unknown``: what NVML answers after a fatal Xid such as 79,
"fallen off the bus") makes the device's reading ``unhealthy``; the reading is still reported,
with the identity (name, type, total memory) from the last good read, so the router marks that
GPU rather than forgetting it. A device whose handle or memory cannot be read for any other reason
is reported ``unknown`` (not placed on, its running work left alone). An error that says NVML
itself is unusable (uninitialised, driver not loaded, library/driver mismatch) fails the whole
read with :class:`NvmlUnavailable`, which the router counts as the worker not answering. Xid
events themselves are not subscribed to; uncorrected ECC errors (Xid 48) show in
``ecc_uncorrected``, which the GPU state monitor turns into ``unhealthy``.

**Memory.** NVML has two memory structs. The v1 struct on an idle H200 (driver 580) says
``used`` = 615 MiB; the v2 struct says ``used`` = 0 and ``reserved`` = 615 MiB (driver and
system reservations), which is what ``nvidia-smi`` shows as 0 MiB used. The reader asks for v2
where the driver and bindings offer it and reports ``memory_used_mb`` = v2 ``used`` + v2
``reserved``: the memory nobody else can allocate, equal to v1 ``used`` (which is the fallback).
Bytes become MiB with the total rounded down and the used memory rounded up, so the room the
router computes (total − used) is never more than NVML's ``free``. ``memory_reserved_mb`` (memory
of the router's own executions) stays 0: NVML cannot attribute memory to the router.

**Types.** :func:`gpu_type_name` maps NVML's device name to a router GPU type: the built-in types
(``H200-141GB``, ``H100-80GB``, ``A100-80GB``, ``L4-24GB``) when the name and the memory match,
otherwise a sanitised name plus the memory in GiB (``RTX-6000-Ada-48GB``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from gpu_request_router.exceptions import GpuRouterError
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES

__all__ = ["UNKNOWN_GPU_TYPE", "NvmlReader", "NvmlUnavailable", "gpu_type_name"]

_T = TypeVar("_T")

_MIB = 2**20
UNKNOWN_GPU_TYPE = "unknown"
"""The type of a device whose memory was never read (it failed before its first good read)."""

# NVML return codes (the C API's nvmlReturn_t; stable across NVML versions).
_NVML_ERROR_UNINITIALIZED = 1
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_GPU_IS_LOST = 15
_NVML_ERROR_RESET_REQUIRED = 16
_NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
_NVML_ERROR_UNKNOWN = 999
# The device is gone or broken: its reading is reported unhealthy.
_DEVICE_FATAL = frozenset(
    {_NVML_ERROR_GPU_IS_LOST, _NVML_ERROR_RESET_REQUIRED, _NVML_ERROR_UNKNOWN}
)
# NVML as a whole is unusable: the read fails.
_HOST_FATAL = frozenset(
    {
        _NVML_ERROR_UNINITIALIZED,
        _NVML_ERROR_DRIVER_NOT_LOADED,
        _NVML_ERROR_LIBRARY_NOT_FOUND,
        _NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    }
)
# NVML constants (nvmlTemperatureSensors_t, nvmlMemoryErrorType_t, nvmlEccCounterType_t).
_NVML_TEMPERATURE_GPU = 0
_NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_NVML_VOLATILE_ECC = 0


class NvmlUnavailable(GpuRouterError):
    """NVML cannot be used on this host (no driver, no library, not initialised)."""

    def __init__(self, worker: str, message: str) -> None:
        super().__init__(f"NVML on worker {worker!r}: {message}")
        self.worker = worker
        self.message = message


# GPU types ---------------------------------------------------------------------------------------

# (token in the device name, built-in type): the type applies when the device name has the token
# and its memory is within _MEMORY_TOLERANCE of the type's (an H100 NVL, 94 GB, is not H100-80GB).
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("H200", "H200-141GB"),
    ("H100", "H100-80GB"),
    ("A100", "A100-80GB"),
    ("L4", "L4-24GB"),
)
_MEMORY_TOLERANCE = 0.05
_DROPPED_TOKENS = frozenset({"nvidia", "generation"})
_MEMORY_TOKEN = re.compile(r"\d+GB", re.IGNORECASE)


def gpu_type_name(name: str, memory_total_mb: int) -> str:
    """The router GPU type of a device called ``name`` with ``memory_total_mb`` MiB.

    ``"NVIDIA H200"`` with 143771 MiB is ``H200-141GB``; H100 80GB, A100 80GB and L4 devices map
    to their built-in types likewise. Any other device gets its name without ``NVIDIA`` and
    ``Generation``, non-alphanumerics as ``-``, plus the memory in GiB unless the name states it:
    ``"NVIDIA RTX 6000 Ada Generation"`` with 49140 MiB is ``RTX-6000-Ada-48GB``,
    ``"NVIDIA A100-SXM4-40GB"`` is ``A100-SXM4-40GB``.
    """
    tokens = [t for t in re.split(r"[^A-Za-z0-9]+", name) if t and t.lower() not in _DROPPED_TOKENS]
    upper = {token.upper() for token in tokens}
    for token, type_name in _FAMILIES:
        builtin = BUILTIN_GPU_TYPES[type_name].memory_mb
        if token in upper and abs(memory_total_mb - builtin) <= builtin * _MEMORY_TOLERANCE:
            return type_name
    base = "-".join(tokens)
    if memory_total_mb <= 0 or any(_MEMORY_TOKEN.fullmatch(token) for token in tokens):
        return base or UNKNOWN_GPU_TYPE
    return f"{base or 'GPU'}-{round(memory_total_mb / 1024)}GB"


# The typed boundary to nvidia-ml-py ---------------------------------------------------------------


class _DeviceLost(Exception):
    """A device answered with an error that means it is gone (GpuIsLost, Unknown)."""


@dataclass(frozen=True, slots=True)
class _Memory:
    """Device memory in bytes: ``used`` is what nobody else can allocate (v2 used + reserved)."""

    total: int
    used: int


class _Nvml:
    """Typed calls into an nvidia-ml-py module (or a stand-in answering like one)."""

    def __init__(self, module: ModuleType) -> None:
        self._m: Any = module
        self.error: type[Exception] = module.NVMLError
        self._memory_v2: int | None = getattr(module, "nvmlMemory_v2", None)

    def init(self) -> None:
        self._m.nvmlInit()

    def shutdown(self) -> None:
        self._m.nvmlShutdown()

    def device_count(self) -> int:
        return int(self._m.nvmlDeviceGetCount())

    def handle(self, index: int) -> object:
        handle: object = self._m.nvmlDeviceGetHandleByIndex(index)
        return handle

    def name(self, handle: object) -> str:
        return _text(self._m.nvmlDeviceGetName(handle))

    def uuid(self, handle: object) -> str:
        return _text(self._m.nvmlDeviceGetUUID(handle))

    def memory(self, handle: object) -> _Memory:
        """v2 (used + reserved) where offered, else v1; device-fatal errors pass through."""
        if self._memory_v2 is not None:
            try:
                info = self._m.nvmlDeviceGetMemoryInfo(handle, version=self._memory_v2)
                return _Memory(total=int(info.total), used=int(info.used) + int(info.reserved))
            except TypeError:  # bindings without the version argument
                pass
            except self.error as exc:
                if _code(exc) in _DEVICE_FATAL | _HOST_FATAL:
                    raise
                # The driver does not offer v2 (FunctionNotFound, ArgumentVersionMismatch, …).
        info = self._m.nvmlDeviceGetMemoryInfo(handle)
        return _Memory(total=int(info.total), used=int(info.used))

    def utilization(self, handle: object) -> float:
        return float(self._m.nvmlDeviceGetUtilizationRates(handle).gpu)

    def temperature(self, handle: object) -> float:
        return float(self._m.nvmlDeviceGetTemperature(handle, _NVML_TEMPERATURE_GPU))

    def power_w(self, handle: object) -> float:
        return int(self._m.nvmlDeviceGetPowerUsage(handle)) / 1000.0

    def ecc_uncorrected(self, handle: object) -> int:
        return int(
            self._m.nvmlDeviceGetTotalEccErrors(
                handle, _NVML_MEMORY_ERROR_TYPE_UNCORRECTED, _NVML_VOLATILE_ECC
            )
        )


def _text(value: object) -> str:
    """NVML strings: ``str`` in current bindings, ``bytes`` in old ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _code(exc: BaseException) -> int | None:
    """The NVML return code an ``NVMLError`` carries."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


# The reader --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Identity:
    """What a device was at its last good read, for reporting it when it fails."""

    name: str
    uuid: str | None
    type: str
    memory_total_mb: int


class NvmlReader:
    """Reads every GPU of this host through NVML (a blocking call; run it in a thread).

    ``nvml`` is the nvidia-ml-py module (imported as ``pynvml`` when not given; tests pass a
    stand-in). NVML is initialised on the first read, once; a failing ``nvmlInit`` raises
    :class:`NvmlUnavailable` and is tried again on the next read. ``slots``, ``models`` and
    ``models_loaded`` are the worker's figures, copied into every reading; ``backend`` defaults to
    the worker's name.

    Example::

        reader = NvmlReader("node-a")
        readings = reader.read()  # [GPUReading(worker="node-a", index=0, type="H200-141GB", …)]
    """

    def __init__(
        self,
        worker: str,
        *,
        nvml: ModuleType | None = None,
        slots: int = 8,
        models: Sequence[str] = ("*",),
        models_loaded: Sequence[str] = (),
        backend: str | None = None,
    ) -> None:
        self.worker = worker
        self._module = nvml
        self._api: _Nvml | None = None
        self._slots = slots
        self._models = tuple(models)
        self._models_loaded = tuple(models_loaded)
        self._backend = worker if backend is None else backend
        self._identities: dict[int, _Identity] = {}
        self._lock = threading.Lock()

    def read(self) -> list[GPUReading]:
        """A complete report of the host's GPUs now, one reading per device NVML counts.

        Raises:
            NvmlUnavailable: NVML cannot be initialised or used on this host.
        """
        with self._lock:
            api = self._initialised()
            try:
                count = api.device_count()
                return [self._read_device(api, index) for index in range(count)]
            except api.error as exc:
                if _code(exc) in _HOST_FATAL:
                    self._api = None  # initialise again on the next read
                raise NvmlUnavailable(self.worker, f"cannot read the GPUs: {exc!r}") from exc

    def close(self) -> None:
        """Shut NVML down if this reader initialised it (a later read initialises it again)."""
        with self._lock:
            api, self._api = self._api, None
            if api is not None:
                with contextlib.suppress(api.error):  # already unusable: nothing to release
                    api.shutdown()

    def _initialised(self) -> _Nvml:
        if self._api is not None:
            return self._api
        module = self._module
        if module is None:
            try:
                module = importlib.import_module("pynvml")
            except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
                raise NvmlUnavailable(self.worker, "nvidia-ml-py is not installed") from exc
        api = _Nvml(module)
        try:
            api.init()
        except api.error as exc:
            raise NvmlUnavailable(
                self.worker,
                f"nvmlInit failed ({exc}): is the NVIDIA driver installed and a GPU visible "
                "to this process?",
            ) from exc
        self._api = api
        return api

    def _read_device(self, api: _Nvml, index: int) -> GPUReading:
        known = self._identities.get(index)
        name = known.name if known else ""
        uuid = known.uuid if known else None
        memory: _Memory | None = None
        values: dict[str, Any] = {}

        def optional(query: Callable[[], _T]) -> _T | None:
            try:
                return query()
            except api.error as exc:
                if _code(exc) in _DEVICE_FATAL:
                    raise _DeviceLost from exc
                if _code(exc) in _HOST_FATAL:
                    raise
                return None

        health = GPUHealth.HEALTHY
        try:
            handle = optional(lambda: api.handle(index))
            if handle is None:
                health = GPUHealth.UNKNOWN
            else:
                name = optional(lambda: api.name(handle)) or name
                uuid = optional(lambda: api.uuid(handle)) or uuid
                memory = optional(lambda: api.memory(handle))
                if memory is None:
                    health = GPUHealth.UNKNOWN
                values["utilization_pct"] = optional(lambda: api.utilization(handle))
                values["temperature_c"] = optional(lambda: api.temperature(handle))
                values["power_w"] = optional(lambda: api.power_w(handle))
                values["ecc_uncorrected"] = optional(lambda: api.ecc_uncorrected(handle)) or 0
        except _DeviceLost:
            health = GPUHealth.UNHEALTHY

        if memory is not None:
            total_mb = memory.total // _MIB
            used_mb = min(total_mb, math.ceil(memory.used / _MIB))
            gpu_type = gpu_type_name(name, total_mb)
            self._identities[index] = _Identity(name, uuid, gpu_type, total_mb)
        elif known is not None:
            total_mb, used_mb, gpu_type = known.memory_total_mb, 0, known.type
        else:
            total_mb, used_mb, gpu_type = 0, 0, UNKNOWN_GPU_TYPE
        return GPUReading(
            worker=self.worker,
            index=index,
            type=gpu_type,
            memory_total_mb=total_mb,
            memory_used_mb=used_mb,
            backend=self._backend,
            name=name,
            uuid=uuid,
            health=health,
            slots=self._slots,
            models=self._models,
            models_loaded=self._models_loaded,
            **values,
        )

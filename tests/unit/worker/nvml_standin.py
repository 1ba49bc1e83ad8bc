"""A stand-in for nvidia-ml-py (``pynvml``) that answers from the real H200 fixture values.

:class:`NvmlStandIn` holds devices in the fixture's format (``tests/data/gpu/nvml_snapshot.json``)
and :meth:`NvmlStandIn.module` gives a module with nvidia-ml-py's function names, constants and
exception classes, for ``NvmlReader(nvml=...)``. Queries the fixture records as an error (fan
speed, retired pages) raise that error. Faults can be injected: any function can be made to raise
an NVML error for one device (once or always), the device count can drop, handles can be
invalidated, and the v2 memory struct can be withdrawn.
"""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "data" / "gpu"

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
nvmlMemory_v2 = 0x02000028  # as nvidia-ml-py defines it (the fixture's memory_v2.version)


class NVMLError(Exception):
    """Base of the stand-in's NVML errors; ``value`` is the NVML return code."""

    value = NVML_ERROR_UNKNOWN

    def __str__(self) -> str:
        return type(self).__name__.removeprefix("NVMLError_")


class NVMLError_Uninitialized(NVMLError):
    value = NVML_ERROR_UNINITIALIZED


class NVMLError_InvalidArgument(NVMLError):
    value = NVML_ERROR_INVALID_ARGUMENT


class NVMLError_NotSupported(NVMLError):
    value = NVML_ERROR_NOT_SUPPORTED


class NVMLError_DriverNotLoaded(NVMLError):
    value = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_FunctionNotFound(NVMLError):
    value = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    value = NVML_ERROR_GPU_IS_LOST


class NVMLError_Unknown(NVMLError):
    value = NVML_ERROR_UNKNOWN


_ERRORS: dict[str, type[NVMLError]] = {
    cls.__name__: cls
    for cls in (
        NVMLError_Uninitialized,
        NVMLError_InvalidArgument,
        NVMLError_NotSupported,
        NVMLError_DriverNotLoaded,
        NVMLError_FunctionNotFound,
        NVMLError_GpuIsLost,
        NVMLError_Unknown,
    )
}


@dataclass
class c_nvmlMemory_t:
    """The v1 memory struct: ``used`` includes the driver's reservation."""

    total: int
    free: int
    used: int


@dataclass
class c_nvmlMemory_v2_t:
    """The v2 memory struct: the driver's reservation is ``reserved``, not ``used``."""

    version: int
    total: int
    reserved: int
    free: int
    used: int


@dataclass
class c_nvmlUtilization_t:
    """Utilization rates (percent over the driver's sampling window)."""

    gpu: int
    memory: int


@dataclass
class c_nvmlProcessInfo_t:
    """One compute process on a device."""

    pid: int
    usedGpuMemory: int


@dataclass(frozen=True)
class Handle:
    """A device handle: the device index and the generation it was issued in."""

    index: int
    generation: int


@dataclass
class _Fault:
    error: type[NVMLError]
    times: int | None  # None: every call


def snapshot() -> dict[str, Any]:
    """The real H200 snapshot (``nvml_snapshot.json``)."""
    data: dict[str, Any] = json.loads((DATA / "nvml_snapshot.json").read_text())
    return data


def fixture_error(entry: object) -> type[NVMLError] | None:
    """The error class a fixture entry records (``{"error": "NVMLError_NotSupported: ..."}``)."""
    if isinstance(entry, dict) and "error" in entry:
        return _ERRORS[str(entry["error"]).split(":", 1)[0]]
    return None


class NvmlStandIn:
    """NVML answering from device dicts in the fixture's format (the H200 snapshot by default)."""

    def __init__(self, devices: list[dict[str, Any]] | None = None) -> None:
        self.devices = devices if devices is not None else copy.deepcopy(snapshot()["devices"])
        self.device_count: int | None = None  # None: len(devices)
        self.init_error: type[NVMLError] | None = None
        self.memory_v2 = True
        self.initialised = 0
        self.shutdowns = 0
        self.handles_issued = 0
        self.calls: list[str] = []
        self._generation = 0
        self._faults: dict[tuple[str, int | None], _Fault] = {}

    # Fault injection ----------------------------------------------------------------------------

    def fail(
        self,
        function: str,
        error: type[NVMLError],
        *,
        index: int | None = None,
        times: int | None = None,
    ) -> None:
        """Make ``function`` raise ``error`` for device ``index`` (every device: None).

        ``times`` limits the fault to that many calls (None: until :meth:`heal`).
        """
        self._faults[(function, index)] = _Fault(error, times)

    def heal(self) -> None:
        """Remove every injected fault."""
        self._faults.clear()

    def invalidate_handles(self) -> None:
        """Make every handle issued so far stale (as after a GPU reset): using one raises."""
        self._generation += 1

    def add_device(self, index: int, uuid: str) -> dict[str, Any]:
        """Add a copy of device 0 as ``index`` with ``uuid``; returns its dict to edit."""
        device = copy.deepcopy(self.devices[0])
        device["index"] = index
        device["uuid"] = uuid
        self.devices.append(device)
        return device

    # The module ---------------------------------------------------------------------------------

    def module(self) -> types.ModuleType:
        """A module answering like nvidia-ml-py from this stand-in's devices."""
        module = types.ModuleType("pynvml_standin")
        for name, value in globals().items():
            if name.startswith(("NVML", "nvmlMemory", "c_nvml")):
                setattr(module, name, value)
        for name in dir(self):
            if name.startswith("nvml") and callable(getattr(self, name)):
                setattr(module, name, getattr(self, name))
        if not self.memory_v2:
            del module.nvmlMemory_v2
        return module

    def _check(self, function: str, index: int | None = None) -> None:
        self.calls.append(function)
        for key in ((function, index), (function, None)):
            fault = self._faults.get(key)
            if fault is None:
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[key]
            raise fault.error()

    def _device(self, function: str, handle: Handle) -> dict[str, Any]:
        if self.initialised <= self.shutdowns:
            raise NVMLError_Uninitialized()
        if handle.generation != self._generation:
            raise NVMLError_InvalidArgument()
        self._check(function, handle.index)
        device: dict[str, Any] = self.devices[handle.index]
        return device

    @staticmethod
    def _value(device: dict[str, Any], key: str) -> Any:
        entry = device[key]
        error = fixture_error(entry)
        if error is not None:
            raise error()
        return entry

    def nvmlInit(self) -> None:
        """Initialise NVML (fails with ``init_error`` when set)."""
        self._check("nvmlInit")
        if self.init_error is not None:
            raise self.init_error()
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        """Shut NVML down."""
        self._check("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        """The device count (``device_count`` when set, to simulate a device dropping off)."""
        if self.initialised <= self.shutdowns:
            raise NVMLError_Uninitialized()
        self._check("nvmlDeviceGetCount")
        return len(self.devices) if self.device_count is None else self.device_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        """A fresh handle of device ``index``."""
        if self.initialised <= self.shutdowns:
            raise NVMLError_Uninitialized()
        self._check("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < len(self.devices):
            raise NVMLError_InvalidArgument()
        self.handles_issued += 1
        return Handle(index, self._generation)

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        """The device name."""
        return str(self._value(self._device("nvmlDeviceGetName", handle), "name"))

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        """The device UUID."""
        return str(self._value(self._device("nvmlDeviceGetUUID", handle), "uuid"))

    def nvmlDeviceGetMemoryInfo(
        self, handle: Handle, version: int | None = None
    ) -> c_nvmlMemory_t | c_nvmlMemory_v2_t:
        """The v1 struct, or with ``version=nvmlMemory_v2`` the v2 struct (if the device has it)."""
        device = self._device("nvmlDeviceGetMemoryInfo", handle)
        if version is None:
            v1 = self._value(device, "memory")
            return c_nvmlMemory_t(total=v1["total"], free=v1["free"], used=v1["used"])
        if version != nvmlMemory_v2 or not self.memory_v2 or "memory_v2" not in device:
            raise NVMLError_FunctionNotFound()
        v2 = self._value(device, "memory_v2")
        return c_nvmlMemory_v2_t(
            version=v2["version"],
            total=v2["total"],
            reserved=v2["reserved"],
            free=v2["free"],
            used=v2["used"],
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> c_nvmlUtilization_t:
        """GPU and memory utilization."""
        rates = self._value(self._device("nvmlDeviceGetUtilizationRates", handle), "utilization")
        return c_nvmlUtilization_t(gpu=rates["gpu"], memory=rates["memory"])

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        """The GPU temperature (°C)."""
        device = self._device("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return int(self._value(device, "temperature_gpu"))

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        """Power draw in milliwatts."""
        return int(self._value(self._device("nvmlDeviceGetPowerUsage", handle), "power_usage_mw"))

    def nvmlDeviceGetTotalEccErrors(
        self, handle: Handle, error_type: int, counter_type: int
    ) -> int:
        """Uncorrected volatile ECC errors (the only counter the fixture has)."""
        device = self._device("nvmlDeviceGetTotalEccErrors", handle)
        if (error_type, counter_type) != (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC):
            raise NVMLError_NotSupported()
        return int(self._value(device, "ecc_uncorrected_volatile"))

    def nvmlDeviceGetFanSpeed(self, handle: Handle) -> int:
        """Fan speed: NotSupported on the H200, as the fixture records."""
        return int(self._value(self._device("nvmlDeviceGetFanSpeed", handle), "fan"))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Handle) -> int:
        """Retired pages pending: NotSupported on the H200, as the fixture records."""
        device = self._device("nvmlDeviceGetRetiredPagesPendingStatus", handle)
        return int(self._value(device, "retired_pages_pending"))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[c_nvmlProcessInfo_t]:
        """The compute processes on the device."""
        device = self._device("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            c_nvmlProcessInfo_t(pid=p["pid"], usedGpuMemory=p["usedGpuMemory"])
            for p in device["compute_processes"]
        ]

"""The NVML reader over the real H200 fixture values, through a stand-in for nvidia-ml-py."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
from typing import Any

import pynvml
import pytest
from nvml_standin import (
    DATA,
    NVMLError,
    NVMLError_DriverNotLoaded,
    NVMLError_GpuIsLost,
    NVMLError_InvalidArgument,
    NVMLError_NotSupported,
    NVMLError_Unknown,
    NvmlStandIn,
)

from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.services.gpu_monitoring import NvmlSource
from gpu_request_router.worker.nvml import (
    UNKNOWN_GPU_TYPE,
    NvmlReader,
    NvmlUnavailable,
    gpu_type_name,
)

MIB = 2**20
UUID = "GPU-00000000-1111-2222-3333-444444444444"


def reader_for(standin: NvmlStandIn, **options: Any) -> NvmlReader:
    """A reader of worker ``node-a`` over the stand-in."""
    return NvmlReader("node-a", nvml=standin.module(), **options)


def read_one(reader: NvmlReader) -> GPUReading:
    """The single reading of a one-GPU host."""
    readings = reader.read()
    assert len(readings) == 1
    return readings[0]


def nvidia_smi() -> dict[str, str]:
    """The nvidia-smi query row of the same GPU, keyed by the bare column name."""
    with (DATA / "nvidia_smi_query.csv").open() as file:
        rows = list(csv.reader(file, skipinitialspace=True))
    return {head.split(" [")[0]: value for head, value in zip(rows[0], rows[1], strict=True)}


# The real H200 ------------------------------------------------------------------------------------


def test_reads_every_field_of_the_idle_h200() -> None:
    """The idle H200 snapshot becomes one complete, healthy reading with its exact figures."""
    reading = read_one(reader_for(NvmlStandIn(), slots=4, models_loaded=("llama-3-8b",)))
    assert reading == GPUReading(
        worker="node-a",
        index=0,
        type="H200-141GB",
        memory_total_mb=143771,
        memory_used_mb=616,  # v2 used 0 + reserved 644939776 B (615.06 MiB), rounded up
        memory_reserved_mb=0,
        backend="node-a",
        name="NVIDIA H200",
        uuid=UUID,
        utilization_pct=0.0,
        temperature_c=41.0,
        power_w=126.245,
        health=GPUHealth.HEALTHY,
        ecc_uncorrected=0,
        slots=4,
        models=("*",),
        models_loaded=("llama-3-8b",),
    )
    assert reading.gpu_id == "node-a:0"


def test_total_memory_is_the_builtin_h200_figure_and_nvidia_smis() -> None:
    """150754820096 bytes are exactly 143771 MiB: the built-in type's and nvidia-smi's total."""
    reading = read_one(reader_for(NvmlStandIn()))
    smi = nvidia_smi()
    assert reading.memory_total_mb == BUILTIN_GPU_TYPES["H200-141GB"].memory_mb == 143771
    assert f"{reading.memory_total_mb} MiB" == smi["memory.total"]
    assert reading.name == smi["name"] and reading.uuid == smi["uuid"]
    assert reading.temperature_c == float(smi["temperature.gpu"])


def test_room_never_exceeds_what_nvml_calls_free() -> None:
    """Total − used is NVML's free memory rounded down (the reservation counts as used)."""
    reading = read_one(reader_for(NvmlStandIn()))
    free_b = NvmlStandIn().devices[0]["memory"]["free"]
    assert reading.memory_total_mb - reading.memory_used_mb == free_b // MIB == 143155


def test_v2_used_and_reserved_are_both_counted() -> None:
    """With a v2 struct of used 10 GiB and reserved 615 MiB, the reading counts both."""
    standin = NvmlStandIn()
    standin.devices[0]["memory_v2"]["used"] = 10 * 2**30
    reading = read_one(reader_for(standin))
    assert reading.memory_used_mb == 10 * 1024 + math.ceil(644939776 / MIB) == 10856


def test_v1_struct_is_the_fallback_and_agrees_with_v2() -> None:
    """Without v2 (old bindings or driver) the v1 used figure gives the same reading."""
    standin = NvmlStandIn()
    standin.memory_v2 = False
    v1 = read_one(reader_for(standin))
    v2 = read_one(reader_for(NvmlStandIn()))
    assert (v1.memory_total_mb, v1.memory_used_mb) == (v2.memory_total_mb, v2.memory_used_mb)
    assert "nvmlDeviceGetMemoryInfo" in standin.calls


def test_v1_fallback_when_the_driver_refuses_v2() -> None:
    """A device whose driver answers FunctionNotFound for v2 is read through v1."""
    standin = NvmlStandIn()
    del standin.devices[0]["memory_v2"]
    reading = read_one(reader_for(standin))
    assert reading.memory_used_mb == 616 and reading.health is GPUHealth.HEALTHY


def test_two_processes_through_the_v1_struct() -> None:
    """The two-process capture (v1 only): 18045403136 bytes used is 17210 MiB, rounded up."""
    capture = json.loads((DATA / "nvml_two_processes.json").read_text())
    standin = NvmlStandIn()
    del standin.devices[0]["memory_v2"]
    standin.devices[0]["memory"] = capture["memory"]
    standin.devices[0]["compute_processes"] = capture["processes"]
    reading = read_one(reader_for(standin))
    assert reading.memory_total_mb == 143771
    assert reading.memory_used_mb == 17210
    # The processes' own figures (allocation plus CUDA context) are inside the device total.
    per_process = sum(p["usedGpuMemory"] for p in capture["processes"])
    assert per_process <= capture["memory"]["used"]


def test_readings_follow_the_sampled_workload() -> None:
    """Every sample of the time series reads back exactly: memory, utilization, power, heat."""
    standin = NvmlStandIn()
    device = standin.devices[0]
    del device["memory_v2"]  # the time series sampled the v1 struct
    reader = reader_for(standin)
    peak: dict[str, float] = {}
    with (DATA / "nvml_timeseries.csv").open() as file:
        for row in csv.DictReader(file):
            device["memory"] = {
                "total": int(row["mem_total_b"]),
                "free": int(row["mem_free_b"]),
                "used": int(row["mem_used_b"]),
            }
            device["utilization"] = {"gpu": int(row["util_gpu_pct"]), "memory": 0}
            device["power_usage_mw"] = int(row["power_mw"])
            device["temperature_gpu"] = int(row["temp_c"])
            reading = read_one(reader)
            assert reading.memory_total_mb == 143771
            assert reading.memory_used_mb == math.ceil(int(row["mem_used_b"]) / MIB)
            assert reading.utilization_pct == float(row["util_gpu_pct"])
            assert reading.power_w == int(row["power_mw"]) / 1000
            assert reading.temperature_c == float(row["temp_c"])
            peak[row["phase"]] = max(peak.get(row["phase"], 0.0), reading.power_w)
    assert peak["matmul_burst"] > 680 > 130 > peak["idle"]
    assert standin.initialised == 1  # NVML initialised once for all reads


# Per-field errors ---------------------------------------------------------------------------------


def test_the_fixture_records_fan_and_retired_pages_as_not_supported() -> None:
    """The stand-in answers NotSupported where the real H200 did, and the reading is unaffected."""
    standin = NvmlStandIn()
    module = standin.module()
    module.nvmlInit()
    handle = module.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(NVMLError_NotSupported):
        module.nvmlDeviceGetFanSpeed(handle)
    with pytest.raises(NVMLError_NotSupported):
        module.nvmlDeviceGetRetiredPagesPendingStatus(handle)
    assert read_one(reader_for(standin)).health is GPUHealth.HEALTHY


@pytest.mark.parametrize(
    ("function", "field", "unread"),
    [
        ("nvmlDeviceGetUtilizationRates", "utilization_pct", None),
        ("nvmlDeviceGetTemperature", "temperature_c", None),
        ("nvmlDeviceGetPowerUsage", "power_w", None),
        ("nvmlDeviceGetTotalEccErrors", "ecc_uncorrected", 0),
        ("nvmlDeviceGetUUID", "uuid", None),
    ],
)
@pytest.mark.parametrize("error", [NVMLError_NotSupported, NVMLError_InvalidArgument])
def test_an_unsupported_field_is_left_unset(
    function: str, field: str, unread: object, error: type[NVMLError]
) -> None:
    """A field NVML refuses is None (0 for ECC); the rest of the reading and its health stand."""
    standin = NvmlStandIn()
    standin.fail(function, error)
    reading = read_one(reader_for(standin))
    assert getattr(reading, field) == unread
    assert reading.health is GPUHealth.HEALTHY
    assert reading.memory_total_mb == 143771 and reading.type == "H200-141GB"


def test_every_optional_field_unsupported_at_once() -> None:
    """A device answering NotSupported to everything but memory still gives a healthy reading."""
    standin = NvmlStandIn()
    for function in (
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTotalEccErrors",
    ):
        standin.fail(function, NVMLError_NotSupported)
    reading = read_one(reader_for(standin))
    assert (reading.utilization_pct, reading.temperature_c, reading.power_w) == (None, None, None)
    assert reading.ecc_uncorrected == 0 and reading.health is GPUHealth.HEALTHY


def test_unreadable_memory_makes_the_device_unknown() -> None:
    """A device whose memory cannot be read (non-fatal error) is reported ``unknown``."""
    standin = NvmlStandIn()
    reader = reader_for(standin)
    read_one(reader)
    standin.fail("nvmlDeviceGetMemoryInfo", NVMLError_NotSupported)
    reading = read_one(reader)
    assert reading.health is GPUHealth.UNKNOWN
    assert reading.type == "H200-141GB" and reading.memory_total_mb == 143771


def test_uncorrected_ecc_errors_are_reported_for_the_monitor() -> None:
    """Uncorrected volatile ECC errors are counted, and the GPU state monitor marks them."""
    standin = NvmlStandIn()
    standin.devices[0]["ecc_uncorrected_volatile"] = 2
    reading = read_one(reader_for(standin))
    assert reading.ecc_uncorrected == 2
    monitor = GPUStateMonitor(stale_after_s=10, safety_margin_mb=1024)
    monitor.apply([reading], 0.0, worker="node-a")
    assert monitor.gpus["node-a:0"].health is GPUHealth.UNHEALTHY


# Device faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [NVMLError_GpuIsLost, NVMLError_Unknown])
@pytest.mark.parametrize(
    "function",
    [
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetName",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperature",
    ],
)
def test_a_lost_gpu_is_still_reported_unhealthy(function: str, error: type[NVMLError]) -> None:
    """GpuIsLost or Unknown from any query reports the device unhealthy, as it was last known."""
    standin = NvmlStandIn()
    reader = reader_for(standin)
    read_one(reader)
    standin.fail(function, error, index=0)
    reading = read_one(reader)
    assert reading.health is GPUHealth.UNHEALTHY
    assert (reading.index, reading.name, reading.uuid) == (0, "NVIDIA H200", UUID)
    assert (reading.type, reading.memory_total_mb) == ("H200-141GB", 143771)
    monitor = GPUStateMonitor(stale_after_s=10, safety_margin_mb=1024)
    assert monitor.apply([reading], 0.0, worker="node-a") == ["node-a:0"]


def test_a_gpu_lost_before_its_first_read_is_reported_unhealthy() -> None:
    """A device lost before any good read is reported unhealthy with an unknown type."""
    standin = NvmlStandIn()
    standin.add_device(1, "GPU-placeholder-1")
    standin.fail("nvmlDeviceGetHandleByIndex", NVMLError_GpuIsLost, index=1)
    lost = reader_for(standin).read()[1]
    assert (lost.index, lost.health, lost.type) == (1, GPUHealth.UNHEALTHY, UNKNOWN_GPU_TYPE)
    assert lost.memory_total_mb == 0


def test_one_lost_gpu_does_not_spoil_the_others() -> None:
    """On a two-GPU host with GPU 1 lost, GPU 0 is read normally."""
    standin = NvmlStandIn()
    standin.add_device(1, "GPU-placeholder-1")
    reader = reader_for(standin)
    reader.read()
    standin.fail("nvmlDeviceGetPowerUsage", NVMLError_GpuIsLost, index=1)
    first, second = reader.read()
    assert first.health is GPUHealth.HEALTHY and first.power_w == 126.245
    assert second.health is GPUHealth.UNHEALTHY and second.uuid == "GPU-placeholder-1"


def test_a_device_dropping_off_the_count_gives_fewer_readings() -> None:
    """One device fewer in NVML's count gives one reading fewer, which the monitor marks lost."""
    standin = NvmlStandIn()
    standin.add_device(1, "GPU-placeholder-1")
    reader = reader_for(standin)
    monitor = GPUStateMonitor(stale_after_s=10, safety_margin_mb=1024)
    assert [r.gpu_id for r in reader.read()] == ["node-a:0", "node-a:1"]
    monitor.apply(reader.read(), 0.0, worker="node-a")
    standin.device_count = 1
    readings = reader.read()
    assert [r.gpu_id for r in readings] == ["node-a:0"]
    assert monitor.apply(readings, 1.0, worker="node-a") == ["node-a:1"]


def test_handles_are_acquired_on_every_read() -> None:
    """Handles made stale between reads (as by a GPU reset) never reach the next read."""
    standin = NvmlStandIn()
    reader = reader_for(standin)
    read_one(reader)
    standin.invalidate_handles()
    assert read_one(reader).health is GPUHealth.HEALTHY
    assert standin.handles_issued == 2


@pytest.mark.parametrize(
    ("error", "health"),
    [(NVMLError_GpuIsLost, GPUHealth.UNHEALTHY), (NVMLError_InvalidArgument, GPUHealth.UNKNOWN)],
)
def test_a_handle_that_fails_once_works_on_the_next_read(
    error: type[NVMLError], health: GPUHealth
) -> None:
    """A device whose handle fails once is reported failing, then read normally again."""
    standin = NvmlStandIn()
    reader = reader_for(standin)
    standin.fail("nvmlDeviceGetHandleByIndex", error, index=0, times=1)
    assert read_one(reader).health is health
    reading = read_one(reader)
    assert reading.health is GPUHealth.HEALTHY and reading.memory_used_mb == 616


# NVML itself ------------------------------------------------------------------------------------


def test_nvml_is_initialised_once() -> None:
    """Many reads initialise NVML once; close shuts it down."""
    standin = NvmlStandIn()
    reader = reader_for(standin)
    for _ in range(3):
        read_one(reader)
    reader.close()
    assert (standin.initialised, standin.shutdowns) == (1, 1)


def test_a_failing_init_raises_a_clear_error_and_is_retried() -> None:
    """A failing nvmlInit raises NvmlUnavailable naming the worker; a later read tries again."""
    standin = NvmlStandIn()
    standin.init_error = NVMLError_DriverNotLoaded
    reader = reader_for(standin)
    with pytest.raises(NvmlUnavailable, match=r"node-a.*nvmlInit failed.*driver") as caught:
        reader.read()
    assert caught.value.worker == "node-a"
    standin.init_error = None
    assert read_one(reader).health is GPUHealth.HEALTHY


def test_nvml_becoming_unusable_fails_the_read() -> None:
    """The driver going away fails the whole read, and the next read initialises NVML again."""
    standin = NvmlStandIn()
    reader = reader_for(standin)
    read_one(reader)
    standin.fail("nvmlDeviceGetCount", NVMLError_DriverNotLoaded, times=1)
    with pytest.raises(NvmlUnavailable, match="cannot read the GPUs"):
        reader.read()
    read_one(reader)
    assert standin.initialised == 2


def test_the_real_bindings_fail_clearly_or_read() -> None:
    """The real nvidia-ml-py either reads this host's GPUs or says clearly why it cannot."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        with pytest.raises(NvmlUnavailable, match="nvmlInit failed"):
            NvmlReader("here").read()
        return
    pynvml.nvmlShutdown()
    reader = NvmlReader("here")
    try:
        readings = reader.read()
    finally:
        reader.close()
    assert len(readings) >= 1
    for reading in readings:
        assert reading.memory_total_mb > reading.memory_used_mb >= 0
        assert reading.type != UNKNOWN_GPU_TYPE and reading.health is GPUHealth.HEALTHY


def test_the_standin_speaks_nvidia_ml_py() -> None:
    """Every function and constant of the stand-in has the real bindings' name and value."""
    module = NvmlStandIn().module()
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith("nvml") and callable(value):
            parameters = inspect.signature(getattr(pynvml, name)).parameters
            assert len(inspect.signature(value).parameters) == len(parameters), name
        elif name.startswith("c_nvml"):
            assert {f.name for f in dataclasses.fields(value)} <= {
                field for field, _ in getattr(pynvml, name)._fields_
            }, name
        elif name.startswith("NVML_"):
            assert getattr(module, name) == getattr(pynvml, name), name
        elif name.startswith("NVMLError_"):
            real = pynvml.NVMLError(getattr(module, name).value)
            assert type(real).__name__ == name
    assert module.nvmlMemory_v2 == pynvml.nvmlMemory_v2 == 0x02000028


# The source --------------------------------------------------------------------------------------


async def test_nvml_source_reads_in_a_thread() -> None:
    """NvmlSource is the router's GpuSource for its own host: the reader's worker and readings."""
    source = NvmlSource(reader_for(NvmlStandIn()))
    assert source.worker == "node-a"
    (reading,) = await source.read()
    assert reading.type == "H200-141GB" and reading.memory_total_mb == 143771


# GPU type names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "memory_mb", "expected"),
    [
        ("NVIDIA H200", 143771, "H200-141GB"),
        ("NVIDIA H200 NVL", 143771, "H200-141GB"),
        ("NVIDIA H100 80GB HBM3", 81559, "H100-80GB"),
        ("NVIDIA H100 PCIe", 81559, "H100-80GB"),
        ("NVIDIA H100 NVL", 95830, "H100-NVL-94GB"),
        ("NVIDIA A100-SXM4-80GB", 81920, "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-SXM4-40GB"),
        ("NVIDIA L4", 23034, "L4-24GB"),
        ("NVIDIA L40S", 46068, "L40S-45GB"),
        ("NVIDIA GH200 480GB", 97871, "GH200-480GB"),
        ("NVIDIA RTX 6000 Ada Generation", 49140, "RTX-6000-Ada-48GB"),
        ("Tesla V100-SXM2-16GB", 16384, "Tesla-V100-SXM2-16GB"),
        ("", 81559, "GPU-80GB"),
        ("", 0, UNKNOWN_GPU_TYPE),
    ],
)
def test_gpu_type_name(name: str, memory_mb: int, expected: str) -> None:
    """Known devices map to the built-in types; others get a sanitised name and their GiB."""
    assert gpu_type_name(name, memory_mb) == expected

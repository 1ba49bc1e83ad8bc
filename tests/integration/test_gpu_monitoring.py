"""dcgm-exporter as a GPU source: a real HTTP exporter on loopback, and the parsing of its text."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.services.gpu_monitoring import DcgmSource, parse_dcgm

SAMPLE = (
    Path(__file__).resolve().parents[1] / "data" / "gpu" / "dcgm_exporter_sample.txt"
).read_text()
UUID_0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID_1 = "GPU-00000000-1111-2222-3333-555555555555"
LABELS = 'gpu="{gpu}",UUID="GPU-{gpu}",modelName="{model}",Hostname="node-b"'


@dataclass
class Exporter:
    """A dcgm-exporter stand-in on 127.0.0.1: serves ``body`` at /metrics with ``status``."""

    url: str
    body: str = SAMPLE
    status: int = 200
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    """A real HTTP server in a thread, answering like dcgm-exporter; stopped after the test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = Exporter(url=f"http://127.0.0.1:{server.server_address[1]}/metrics")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            found = self.path == "/metrics"
            body = (state.body if found else "not found").encode()
            self.send_response(state.status if found else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep the test output quiet."""

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def text(*lines: str, model: str = "NVIDIA H200") -> str:
    """Prometheus text of ``METRIC GPU VALUE`` lines, with dcgm-exporter's labels."""
    out = []
    for line in lines:
        metric, gpu, value = line.split()
        out.append(f"{metric}{{{LABELS.format(gpu=gpu, model=model)}}} {value}")
    return "\n".join(out) + "\n"


def memory(gpu: str = "0", used: int = 0, free: int = 143155, reserved: int = 616) -> list[str]:
    """The three framebuffer lines of one GPU (the idle H200's by default)."""
    return [
        f"DCGM_FI_DEV_FB_USED {gpu} {used}",
        f"DCGM_FI_DEV_FB_FREE {gpu} {free}",
        f"DCGM_FI_DEV_FB_RESERVED {gpu} {reserved}",
    ]


# A real exporter over HTTP ------------------------------------------------------------------------


async def test_reads_two_gpus_from_a_live_exporter(exporter: Exporter) -> None:
    """DcgmSource GETs the exporter and turns its two H200s into exact readings."""
    source = DcgmSource(exporter.url, "node-a", backend="vllm-a", slots=4)
    try:
        idle, busy = await source.read()
    finally:
        await source.aclose()
    assert exporter.requests == ["/metrics"]
    assert idle == GPUReading(
        worker="node-a",
        index=0,
        type="H200-141GB",
        memory_total_mb=143771,
        memory_used_mb=616,
        backend="vllm-a",
        name="NVIDIA H200",
        uuid=UUID_0,
        utilization_pct=0.0,
        temperature_c=41.0,
        power_w=126.245,
        health=GPUHealth.HEALTHY,
        ecc_uncorrected=0,
        slots=4,
    )
    assert (busy.gpu_id, busy.uuid, busy.type) == ("node-a:1", UUID_1, "H200-141GB")
    assert (busy.memory_total_mb, busy.memory_used_mb) == (143771, 42676)
    assert (busy.utilization_pct, busy.temperature_c, busy.power_w) == (100.0, 60.0, 692.573)


async def test_a_given_client_is_used_and_left_open(exporter: Exporter) -> None:
    """A source given an httpx client reads through it and does not close it."""
    async with httpx.AsyncClient() as client:
        source = DcgmSource(exporter.url, "node-a", client=client, gpu_type="H200-141GB")
        assert len(await source.read()) == 2
        await source.aclose()
        assert len(await source.read()) == 2
        assert not client.is_closed


async def test_an_exporter_answering_500_raises(exporter: Exporter) -> None:
    """An error status is raised (the router counts the worker as not answering)."""
    exporter.status = 500
    source = DcgmSource(exporter.url, "node-a")
    try:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            await source.read()
    finally:
        await source.aclose()
    assert caught.value.response.status_code == 500


async def test_a_wrong_path_raises(exporter: Exporter) -> None:
    """A 404 (the exporter URL is wrong) is raised, not read as a host without GPUs."""
    source = DcgmSource(exporter.url.removesuffix("/metrics") + "/nothing", "node-a")
    try:
        with pytest.raises(httpx.HTTPStatusError):
            await source.read()
    finally:
        await source.aclose()


async def test_an_unreachable_exporter_raises() -> None:
    """Nothing listening on the exporter's port raises a connection error."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = DcgmSource(f"http://127.0.0.1:{port}/metrics", "node-a", timeout_s=2)
    try:
        with pytest.raises(httpx.ConnectError):
            await source.read()
    finally:
        await source.aclose()


async def test_an_answer_that_is_not_prometheus_text_raises(exporter: Exporter) -> None:
    """An answer that is not Prometheus text is refused, not read as no GPUs."""
    exporter.body = "<html>\n<body>login required</body>\n</html>\n"
    source = DcgmSource(exporter.url, "node-a")
    try:
        with pytest.raises(ValueError, match="did not answer with Prometheus text"):
            await source.read()
    finally:
        await source.aclose()


# parse_dcgm -------------------------------------------------------------------------------------


def test_the_sample_parses_without_http() -> None:
    """parse_dcgm gives the same readings for the sample text as the live source."""
    readings = parse_dcgm(SAMPLE, "node-a")
    assert [r.gpu_id for r in readings] == ["node-a:0", "node-a:1"]
    assert [r.memory_total_mb for r in readings] == [143771, 143771]
    assert all(r.health is GPUHealth.HEALTHY and r.backend == "" for r in readings)


def test_without_reserved_the_total_is_used_plus_free() -> None:
    """An exporter without FB_RESERVED (older DCGM, used includes it): total = used + free."""
    (reading,) = parse_dcgm(
        text("DCGM_FI_DEV_FB_USED 0 615", "DCGM_FI_DEV_FB_FREE 0 143156"), "node-b"
    )
    assert (reading.memory_total_mb, reading.memory_used_mb) == (143771, 615)


def test_missing_metrics_leave_fields_unset() -> None:
    """Only memory exported: utilization, temperature and power are None, ECC 0, healthy."""
    (reading,) = parse_dcgm(text(*memory()), "node-b")
    assert (reading.utilization_pct, reading.temperature_c, reading.power_w) == (None, None, None)
    assert reading.ecc_uncorrected == 0 and reading.health is GPUHealth.HEALTHY
    assert (reading.uuid, reading.name, reading.type) == ("GPU-0", "NVIDIA H200", "H200-141GB")


def test_missing_memory_makes_the_gpu_unknown() -> None:
    """A GPU without memory metrics (and no configured total) is reported unknown, total 0."""
    (reading,) = parse_dcgm(text("DCGM_FI_DEV_GPU_UTIL 0 35"), "node-b")
    assert reading.health is GPUHealth.UNKNOWN and reading.memory_total_mb == 0
    assert reading.utilization_pct == 35.0


def test_configured_type_and_total_apply() -> None:
    """A configured type names the GPU and gives its total when the exporter lacks memory."""
    (reading,) = parse_dcgm(text("DCGM_FI_DEV_GPU_TEMP 0 50"), "node-b", gpu_type="H100-80GB")
    assert (reading.type, reading.memory_total_mb, reading.health) == (
        "H100-80GB",
        81559,
        GPUHealth.HEALTHY,
    )
    (custom,) = parse_dcgm(text(*memory()), "node-b", memory_total_mb=140000)
    assert custom.memory_total_mb == 140000 and custom.memory_used_mb == 616


def test_an_unknown_model_gets_a_sanitised_type() -> None:
    """A model the router has no built-in type for is named after it and its memory."""
    lines = memory(used=0, free=48524, reserved=616)
    (reading,) = parse_dcgm(text(*lines, model="NVIDIA RTX 6000 Ada Generation"), "node-b")
    assert reading.type == "RTX-6000-Ada-48GB" and reading.memory_total_mb == 49140


def test_a_nonzero_xid_makes_the_gpu_unhealthy() -> None:
    """A nonzero last Xid (e.g. 79, fallen off the bus) reports that GPU unhealthy."""
    lines = [
        *memory("0"),
        *memory("1"),
        "DCGM_FI_DEV_XID_ERRORS 0 0",
        "DCGM_FI_DEV_XID_ERRORS 1 79",
    ]
    first, second = parse_dcgm(text(*lines), "node-b")
    assert first.health is GPUHealth.HEALTHY
    assert second.health is GPUHealth.UNHEALTHY
    monitor = GPUStateMonitor(stale_after_s=10, safety_margin_mb=1024)
    assert monitor.apply([first, second], 0.0, worker="node-b") == ["node-b:1"]


def test_uncorrected_ecc_errors_make_the_monitor_mark_the_gpu() -> None:
    """Double-bit (uncorrected) volatile ECC errors are reported so the monitor marks the GPU."""
    body = (
        "# TYPE DCGM_FI_DEV_ECC_DBE_VOL_TOTAL counter\n"
        + text(*memory("0"), *memory("1"), "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL 0 0")
        + text("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL 1 3")
    )
    first, second = parse_dcgm(body, "node-b")
    assert (first.ecc_uncorrected, second.ecc_uncorrected) == (0, 3)
    monitor = GPUStateMonitor(stale_after_s=10, safety_margin_mb=1024)
    monitor.apply([first, second], 0.0, worker="node-b")
    assert monitor.gpus["node-b:0"].health is GPUHealth.HEALTHY
    assert monitor.gpus["node-b:1"].health is GPUHealth.UNHEALTHY


def test_dcgm_blank_values_are_missing() -> None:
    """DCGM's not-supported sentinel (9223372036854775794) leaves the field None."""
    lines = [
        *memory(),
        "DCGM_FI_DEV_GPU_TEMP 0 9223372036854775794",
        "DCGM_FI_DEV_POWER_USAGE 0 80",
    ]
    (reading,) = parse_dcgm(text(*lines), "node-b")
    assert reading.temperature_c is None and reading.power_w == 80.0


def test_mig_instance_series_are_ignored() -> None:
    """Series of MIG instances (a GPU_I_ID label) do not overwrite the whole GPU's figures."""
    mig = 'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-0",GPU_I_ID="1",GPU_I_PROFILE="1g.18gb"} 9000\n'
    (reading,) = parse_dcgm(text(*memory()) + mig, "node-b")
    assert reading.memory_used_mb == 616


def test_no_gpus_and_no_text() -> None:
    """An exporter with only non-DCGM metrics (or nothing) reports no GPUs."""
    assert parse_dcgm("", "node-b") == []
    assert parse_dcgm("# TYPE go_goroutines gauge\ngo_goroutines 12\n", "node-b") == []

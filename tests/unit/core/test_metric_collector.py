"""Tests for the Prometheus metrics and the in-memory summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gpu_request_router.core.metric_collector import MetricCollector, percentile
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading, GPUState
from gpu_request_router.models.request import (
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    Task,
)

T0 = 1_700_000_000.0
PLACEMENT = Placement("w", ("w:0",))


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry per test, never the global default one."""
    return CollectorRegistry()


@pytest.fixture
def collector(registry: CollectorRegistry) -> MetricCollector:
    """A collector on the test's registry."""
    return MetricCollector(registry)


def make_request(
    rid: str = "r1", *, created_at: float = T0, priority: str = "normal", model: str = "llama"
) -> Request:
    """A queued request with a minimal estimate."""
    return Request(
        id=rid,
        user="alice",
        model=model,
        task=Task.CHAT,
        priority=priority,
        estimate=Estimate(
            gpu_memory_mb=1,
            weights_mb=0,
            kv_cache_mb=1,
            activations_mb=0,
            duration_s={"H100-80GB": 1.0},
        ),
        created_at=created_at,
    )


def succeeded(
    rid: str = "r1",
    *,
    created_at: float = T0,
    dispatched: float = 1.0,
    started: float = 2.0,
    finished: float = 5.0,
    priority: str = "normal",
    model: str = "llama",
) -> Request:
    """A request moved queued -> dispatching -> running -> succeeded (offsets from created_at)."""
    r = make_request(rid, created_at=created_at, priority=priority, model=model)
    r.transition(RequestStatus.DISPATCHING, created_at + dispatched, placement=PLACEMENT)
    r.transition(RequestStatus.RUNNING, created_at + started)
    r.transition(RequestStatus.SUCCEEDED, created_at + finished, result={"ok": True})
    return r


def gpu_state(
    index: int = 0,
    *,
    used_mb: int = 1000,
    reserved_mb: int = 500,
    util: float | None = 42.0,
    health: GPUHealth = GPUHealth.HEALTHY,
) -> GPUState:
    """A GPU state on worker ``w``."""
    reading = GPUReading(
        worker="w",
        index=index,
        type="H100-80GB",
        memory_total_mb=81559,
        memory_used_mb=used_mb,
        utilization_pct=util,
    )
    return GPUState(reading=reading, last_seen=T0, health=health, reserved_mb=reserved_mb)


class TestConstruction:
    def test_uses_only_the_injected_registry(self, registry: CollectorRegistry) -> None:
        """Two collectors on two registries do not clash (no global default registry)."""
        MetricCollector(registry)
        MetricCollector(CollectorRegistry())
        assert b"gpurouter_queue_depth" in generate_latest(registry)

    @pytest.mark.parametrize(("window_s", "max_samples"), [(0.0, 10), (-1.0, 10), (1.0, 0)])
    def test_rejects_bad_bounds(self, window_s: float, max_samples: int) -> None:
        """A window must be positive and at least one sample must be kept."""
        with pytest.raises(ValueError, match="must be"):
            MetricCollector(CollectorRegistry(), window_s=window_s, max_samples=max_samples)


class TestRequests:
    def test_finished_counts_by_status_priority_model(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Each terminal request counts once under its status, priority and model."""
        collector.request_finished(succeeded("a"), T0 + 5)
        collector.request_finished(succeeded("b"), T0 + 5)
        failed = make_request("c", priority="high", model="mistral")
        failed.transition(RequestStatus.DISPATCHING, T0 + 1, placement=PLACEMENT)
        failed.transition(RequestStatus.FAILED, T0 + 2, error=ErrorInfo("backend", "boom"))
        collector.request_finished(failed, T0 + 2)
        cancelled = make_request("d")
        cancelled.transition(RequestStatus.CANCELLED, T0 + 3)
        collector.request_finished(cancelled, T0 + 3)

        def value(status: str, priority: str, model: str) -> float | None:
            return registry.get_sample_value(
                "gpurouter_requests_total",
                {"status": status, "priority": priority, "model": model},
            )

        assert value("succeeded", "normal", "llama") == 2
        assert value("failed", "high", "mistral") == 1
        assert value("cancelled", "normal", "llama") == 1
        assert value("expired", "normal", "llama") is None
        assert collector.summary(T0 + 5)["requests"] == {
            "succeeded": 2,
            "failed": 1,
            "cancelled": 1,
        }

    def test_finished_rejects_a_request_that_is_not_terminal(
        self, collector: MetricCollector
    ) -> None:
        """Counting a request that is still live is a caller bug."""
        with pytest.raises(ValueError, match="not terminal"):
            collector.request_finished(make_request(), T0)

    def test_duration_histogram_for_succeeded_requests_only(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Started -> finished of succeeded requests goes to the duration histogram."""
        collector.request_finished(succeeded("a", started=2.0, finished=5.0), T0 + 5)
        failed = make_request("b")
        failed.transition(RequestStatus.DISPATCHING, T0 + 1, placement=PLACEMENT)
        failed.transition(RequestStatus.RUNNING, T0 + 2)
        failed.transition(RequestStatus.FAILED, T0 + 50, error=ErrorInfo("oom", "out of memory"))
        collector.request_finished(failed, T0 + 50)

        name = "gpurouter_request_duration_seconds"
        assert registry.get_sample_value(f"{name}_count") == 1
        assert registry.get_sample_value(f"{name}_sum") == pytest.approx(3.0)
        assert registry.get_sample_value(f"{name}_bucket", {"le": "2.5"}) == 0
        assert registry.get_sample_value(f"{name}_bucket", {"le": "5.0"}) == 1
        # Latency (created -> finished) is sampled for the succeeded request only.
        assert collector.summary(T0 + 50)["latency_s"] == {"p50": 5.0, "p90": 5.0, "p99": 5.0}

    def test_rejected_counts_by_reason(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Admission rejections count per reason."""
        collector.request_rejected("quota", "alice")
        collector.request_rejected("quota", "bob")
        collector.request_rejected("queue_full", "alice")
        name = "gpurouter_requests_rejected_total"
        assert registry.get_sample_value(name, {"reason": "quota"}) == 2
        assert registry.get_sample_value(name, {"reason": "queue_full"}) == 1
        assert collector.summary(T0)["rejected"] == {"quota": 2, "queue_full": 1}

    def test_each_users_counts_are_kept_apart(self, collector: MetricCollector) -> None:
        """counts_of gives one user's ended requests, rejections and retries, nobody else's."""
        collector.request_finished(succeeded(), T0 + 5)  # alice's
        bobs = make_request("b1", created_at=T0 - 5.0)
        bobs.user = "bob"
        bobs.transition(RequestStatus.CANCELLED, T0)
        collector.request_finished(bobs, T0)
        collector.request_rejected("quota", "bob")
        collector.request_rejected("queue_full", "alice")
        collector.retry("timeout", "bob")
        assert collector.counts_of("alice") == {
            "requests": {"succeeded": 1},
            "rejected": {"queue_full": 1},
            "retries": {},
        }
        assert collector.counts_of("bob") == {
            "requests": {"cancelled": 1},
            "rejected": {"quota": 1},
            "retries": {"timeout": 1},
        }
        assert collector.counts_of("carol") == {"requests": {}, "rejected": {}, "retries": {}}
        summary = collector.summary(T0 + 10)
        assert summary["requests"] == {"succeeded": 1, "cancelled": 1}
        assert summary["rejected"] == {"quota": 1, "queue_full": 1}

    def test_dispatched_records_queue_wait_per_priority(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """The queue wait goes to the per-priority histogram and to the summary samples."""
        collector.request_dispatched(make_request("a", priority="high"), 0.2)
        collector.request_dispatched(make_request("b", priority="high"), 0.4)
        collector.request_dispatched(make_request("c", priority="low"), 30.0)
        name = "gpurouter_queue_wait_seconds"
        assert registry.get_sample_value(f"{name}_count", {"priority": "high"}) == 2
        assert registry.get_sample_value(f"{name}_sum", {"priority": "high"}) == pytest.approx(0.6)
        assert registry.get_sample_value(f"{name}_count", {"priority": "low"}) == 1
        assert registry.get_sample_value(f"{name}_bucket", {"priority": "low", "le": "10.0"}) == 0
        assert registry.get_sample_value(f"{name}_bucket", {"priority": "low", "le": "30.0"}) == 1
        assert collector.summary(T0)["queue_wait_s"] == {"p50": 0.4, "p90": 30.0, "p99": 30.0}

    def test_retries_count_by_reason(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Retries count per reason."""
        collector.retry("backend_unavailable", "alice")
        collector.retry("backend_unavailable", "bob")
        collector.retry("timeout", "alice")
        name = "gpurouter_retries_total"
        assert registry.get_sample_value(name, {"reason": "backend_unavailable"}) == 2
        assert registry.get_sample_value(name, {"reason": "timeout"}) == 1
        assert collector.summary(T0)["retries"] == {"backend_unavailable": 2, "timeout": 1}

    def test_decision_histogram_resolves_microseconds(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Decision times from 10 µs to 100 ms land in distinct buckets."""
        for seconds in (0.000008, 0.00002, 0.003, 0.09):
            collector.decision(seconds)
        name = "gpurouter_dispatch_decision_seconds"
        assert registry.get_sample_value(f"{name}_count") == 4
        assert registry.get_sample_value(f"{name}_bucket", {"le": "1e-05"}) == 1
        assert registry.get_sample_value(f"{name}_bucket", {"le": "2.5e-05"}) == 2
        assert registry.get_sample_value(f"{name}_bucket", {"le": "0.005"}) == 3
        assert registry.get_sample_value(f"{name}_bucket", {"le": "0.1"}) == 4


class TestQueueDepth:
    def test_sets_depth_per_priority(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Each priority class gets its own gauge value."""
        collector.set_queue_depth({"high": 3, "normal": 7})
        name = "gpurouter_queue_depth"
        assert registry.get_sample_value(name, {"priority": "high"}) == 3
        assert registry.get_sample_value(name, {"priority": "normal"}) == 7
        assert collector.summary(T0)["queue_depth"] == {"high": 3, "normal": 7}

    def test_a_class_that_disappears_is_reset_to_zero(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """A class missing from a later mapping reads 0, not its stale depth."""
        collector.set_queue_depth({"high": 3, "normal": 7})
        collector.set_queue_depth({"normal": 2})
        name = "gpurouter_queue_depth"
        assert registry.get_sample_value(name, {"priority": "high"}) == 0
        assert registry.get_sample_value(name, {"priority": "normal"}) == 2
        assert registry.get_sample_value(name, {"priority": "low"}) is None
        assert collector.summary(T0)["queue_depth"] == {"high": 0, "normal": 2}


class TestGPUs:
    def test_publishes_memory_utilisation_and_health(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """Memory in bytes, utilisation as a ratio and health as 1/0, per GPU id."""
        collector.gpu(gpu_state(0, used_mb=1000, reserved_mb=500, util=42.0))
        labels = {"gpu": "w:0"}
        assert registry.get_sample_value("gpurouter_gpu_memory_used_bytes", labels) == (
            1000 * 2**20
        )
        assert registry.get_sample_value("gpurouter_gpu_memory_reserved_bytes", labels) == (
            500 * 2**20
        )
        assert registry.get_sample_value(
            "gpurouter_gpu_utilization_ratio", labels
        ) == pytest.approx(0.42)
        assert registry.get_sample_value("gpurouter_gpu_healthy", labels) == 1

    def test_unknown_utilisation_reads_zero(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """A device that does not report utilisation publishes 0."""
        collector.gpu(gpu_state(0, util=None))
        assert registry.get_sample_value("gpurouter_gpu_utilization_ratio", {"gpu": "w:0"}) == 0

    @pytest.mark.parametrize(
        ("health", "expected"),
        [
            (GPUHealth.HEALTHY, 1),
            (GPUHealth.DEGRADED, 1),
            (GPUHealth.UNHEALTHY, 0),
            (GPUHealth.UNKNOWN, 0),
        ],
    )
    def test_health(
        self,
        collector: MetricCollector,
        registry: CollectorRegistry,
        health: GPUHealth,
        expected: int,
    ) -> None:
        """Healthy and degraded GPUs take work (1); the others do not (0)."""
        collector.gpu(gpu_state(0, health=health))
        assert registry.get_sample_value("gpurouter_gpu_healthy", {"gpu": "w:0"}) == expected

    def test_forget_gpu_removes_its_series(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """A forgotten GPU's series disappear; the other GPUs' stay."""
        collector.gpu(gpu_state(0))
        collector.gpu(gpu_state(1))
        collector.forget_gpu("w:0")
        collector.forget_gpu("w:0")  # a second time is harmless
        collector.forget_gpu("nope:9")  # so is a GPU never seen
        names = (
            "gpurouter_gpu_memory_used_bytes",
            "gpurouter_gpu_memory_reserved_bytes",
            "gpurouter_gpu_utilization_ratio",
            "gpurouter_gpu_healthy",
        )
        for name in names:
            assert registry.get_sample_value(name, {"gpu": "w:0"}) is None, name
            assert registry.get_sample_value(name, {"gpu": "w:1"}) is not None, name
        collector.gpu(gpu_state(0))  # it can come back
        assert registry.get_sample_value("gpurouter_gpu_healthy", {"gpu": "w:0"}) == 1


class TestEstimatesAndCircuits:
    def test_estimate_error_per_model_and_kind(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """The latest ratio per (model, kind) replaces the previous one."""
        collector.estimate_error("llama", "memory", 0.1)
        collector.estimate_error("llama", "memory", -0.05)
        collector.estimate_error("llama", "duration", 0.3)
        name = "gpurouter_estimate_error_ratio"
        assert registry.get_sample_value(name, {"model": "llama", "kind": "memory"}) == -0.05
        assert registry.get_sample_value(name, {"model": "llama", "kind": "duration"}) == 0.3

    def test_circuit_open_and_closed(
        self, collector: MetricCollector, registry: CollectorRegistry
    ) -> None:
        """An open breaker reads 1, a closed one 0."""
        collector.circuit("vllm-a", is_open=True)
        collector.circuit("vllm-b", is_open=False)
        assert registry.get_sample_value("gpurouter_circuit_open", {"backend": "vllm-a"}) == 1
        assert registry.get_sample_value("gpurouter_circuit_open", {"backend": "vllm-b"}) == 0
        collector.circuit("vllm-a", is_open=False)
        assert registry.get_sample_value("gpurouter_circuit_open", {"backend": "vllm-a"}) == 0


class TestPercentiles:
    def test_nearest_rank_on_one_to_hundred(self) -> None:
        """1..100: p50 = 50, p90 = 90, p99 = 99 (nearest rank)."""
        ordered = [float(i) for i in range(1, 101)]
        assert percentile(ordered, 50) == 50
        assert percentile(ordered, 90) == 90
        assert percentile(ordered, 99) == 99
        assert percentile(ordered, 100) == 100
        assert percentile(ordered, 0) == 1

    def test_small_and_empty_sets(self) -> None:
        """One sample is every percentile; no samples give None."""
        assert percentile([7.0], 50) == 7.0
        assert percentile([7.0], 99) == 7.0
        assert percentile([], 50) is None

    def test_summary_percentiles_from_unsorted_samples(self, collector: MetricCollector) -> None:
        """The summary sorts the samples it holds, whatever order they came in."""
        for i in (*range(100, 50, -1), *range(1, 51)):
            collector.request_dispatched(make_request(f"r{i}"), float(i))
        assert collector.summary(T0)["queue_wait_s"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0}

    def test_empty_summary(self, collector: MetricCollector) -> None:
        """Before anything happened: empty counts, None percentiles, zero throughput."""
        summary = collector.summary(T0)
        assert summary == {
            "requests": {},
            "rejected": {},
            "queue_depth": {},
            "queue_wait_s": {"p50": None, "p90": None, "p99": None},
            "latency_s": {"p50": None, "p90": None, "p99": None},
            "throughput_rps": 0.0,
            "retries": {},
        }
        json.dumps(summary)

    def test_samples_are_bounded(self, registry: CollectorRegistry) -> None:
        """Only the most recent max_samples samples count towards the percentiles."""
        collector = MetricCollector(registry, max_samples=10)
        for i in range(1, 101):
            collector.request_dispatched(make_request(f"r{i}"), float(i))
        assert collector.summary(T0)["queue_wait_s"] == {"p50": 95.0, "p90": 99.0, "p99": 100.0}
        # The histogram still saw every observation.
        name = "gpurouter_queue_wait_seconds_count"
        assert registry.get_sample_value(name, {"priority": "normal"}) == 100


class TestThroughput:
    def test_rate_over_the_window(self, registry: CollectorRegistry) -> None:
        """Completions older than the window drop out of the rate."""
        collector = MetricCollector(registry, window_s=60.0)
        # 30 completions spread over t = 0..29 s, then 60 over t = 100..159 s (one per second).
        for i in range(30):
            collector.request_finished(succeeded(f"a{i}", created_at=T0 + i - 5.0), T0 + i)
        for i in range(60):
            t = T0 + 100 + i
            collector.request_finished(succeeded(f"b{i}", created_at=t - 5.0), t)
        # At t = 160 the window is (100, 160]: 60 completions in 60 s.
        assert collector.summary(T0 + 160)["throughput_rps"] == pytest.approx(1.0)
        # At t = 190 only the completions at 130..159 are left in the window.
        assert collector.summary(T0 + 190)["throughput_rps"] == pytest.approx(30 / 60)
        # Long after, nothing is left.
        assert collector.summary(T0 + 1000)["throughput_rps"] == 0.0

    def test_rate_since_the_first_completion_when_shorter(
        self, registry: CollectorRegistry
    ) -> None:
        """Early on, the rate is over the time since the first completion, not the window."""
        collector = MetricCollector(registry, window_s=300.0)
        for i in range(10):
            t = T0 + 2.0 * i  # completions at 0, 2, ..., 18 s
            collector.request_finished(succeeded(f"r{i}", created_at=t - 5.0), t)
        assert collector.summary(T0 + 20)["throughput_rps"] == pytest.approx(10 / 20)

    def test_a_burst_at_one_instant_does_not_divide_by_zero(
        self, collector: MetricCollector
    ) -> None:
        """Completions all at ``now`` give a finite rate."""
        for i in range(5):
            collector.request_finished(succeeded(f"r{i}", created_at=T0 - 5.0), T0)
        assert collector.summary(T0)["throughput_rps"] == pytest.approx(5.0)

    def test_only_succeeded_requests_count(self, collector: MetricCollector) -> None:
        """Failed, cancelled and expired requests are not completions."""
        cancelled = make_request("c", created_at=T0 - 5.0)
        cancelled.transition(RequestStatus.CANCELLED, T0)
        collector.request_finished(cancelled, T0)
        assert collector.summary(T0 + 10)["throughput_rps"] == 0.0

    def test_summary_is_json_ready(self, collector: MetricCollector) -> None:
        """The summary serialises as JSON as is."""
        collector.request_finished(succeeded(), T0 + 5)
        collector.request_dispatched(make_request("q"), 1.5)
        collector.set_queue_depth({"normal": 1})
        collector.request_rejected("quota", "alice")
        collector.retry("timeout", "alice")
        text = json.dumps(collector.summary(T0 + 10))
        assert json.loads(text)["latency_s"]["p50"] == 5.0


ARCHITECTURE = Path(__file__).parents[3] / "docs" / "architecture.md"


def _documented_metrics() -> dict[str, tuple[str, str]]:
    """The metrics table under "## Metrics" of docs/architecture.md: name -> (type, meaning)."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("\n## Metrics\n") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`gpurouter_"):
            rows[cells[0].strip("`")] = (cells[1], cells[3])
    return rows


def test_every_metric_is_documented_with_its_type_and_meaning(registry: CollectorRegistry) -> None:
    """Operators read what a metric means in the docs: each HELP text is there word for word."""
    MetricCollector(registry)
    exported = {
        (family.name + "_total" if family.type == "counter" else family.name): (
            family.type,
            family.documentation,
        )
        for family in registry.collect()
    }
    assert exported == _documented_metrics()

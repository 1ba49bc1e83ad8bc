"""Unit tests of ``gpurouter bench replay``: trace readers, user assignment, metrics, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_request_router.bench.provenance import problems
from gpu_request_router.bench.replay import (
    REQUIRED_METRICS,
    Fleet,
    assign_models,
    assign_users,
    jain_index,
    parse_gpus,
    percentile,
    plan_rows,
    replay,
    replay_settings,
    scaled_catalog,
    summarize,
    user_of,
)
from gpu_request_router.bench.traces import (
    ALIBABA_MAX_DURATION_S,
    TraceError,
    TraceRow,
    detect_format,
    read_alibaba_pods,
    read_azure,
    read_generic,
    read_trace,
)
from gpu_request_router.cli import app
from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.engine import fleet_gpu_types
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.models.request import Shape, Task
from gpu_request_router.simulation import Rejection, RequestRecord, SimulationReport

MIXED_CATALOG = Path(__file__).parents[3] / "benchmarks" / "replay" / "mixed_catalog.yaml"
AZURE_CONV = (
    Path(__file__).parents[3]
    / "benchmarks"
    / "traces"
    / "azure_llm_2023"
    / "AzureLLMInferenceTrace_conv.csv"
)
AZURE_TEXT = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:16:46.6805900,879,55\n"
)
ALIBABA_TEXT = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,"
    "deletion_time,scheduled_time\n"
    "openb-pod-0000,12000,16384,1,1000,,LS,Running,100,700,100\n"
    "openb-pod-0001,6000,12288,1,500,,BE,Running,160,160,160\n"
    "openb-pod-0002,4000,8192,0,0,,BE,Running,170,900,170\n"
    "openb-pod-0003,8000,30517,2,1000,,Burstable,Pending,200,,\n"
    "openb-pod-0004,8000,30517,1,250,,Other,Running,300,9000000,300\n"
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    """Write ``text`` to ``name`` in ``tmp_path``."""
    path = tmp_path / name
    path.write_text(text)
    return path


def record(
    request_id: str,
    *,
    user: str = "u01",
    status: str = "succeeded",
    created: float = 0.0,
    started: float | None = 0.0,
    finished: float | None = 10.0,
    wait: float = 0.0,
    memory: int = 1000,
    error: str | None = None,
    retried: tuple[str, ...] = (),
) -> RequestRecord:
    """A simulation record of one request, by hand."""
    return RequestRecord(
        id=request_id,
        user=user,
        model="llama-3-8b",
        priority="normal",
        status=status,
        attempts=1 + len(retried),
        worker="sim",
        gpu_ids=("sim:0",),
        reason="",
        created_at=created,
        dispatched_at=started,
        started_at=started,
        finished_at=finished,
        queue_wait_s=wait,
        error=error,
        gpu_memory_mb=memory,
        retried_after=retried,
    )


# Readers ---------------------------------------------------------------------------------------


def test_azure_reader_counts_time_from_the_first_row(tmp_path: Path) -> None:
    """Azure rows keep their token counts and their time from the first row, in seconds."""
    rows = read_azure(write(tmp_path, "azure.csv", AZURE_TEXT))
    assert [row.input_tokens for row in rows] == [374, 396, 879]
    assert [row.output_tokens for row in rows] == [44, 109, 55]
    assert [round(row.timestamp_s, 6) for row in rows] == [0.0, 4.314579, 60.0]
    assert all(row.user is None and row.model is None for row in rows)


def test_alibaba_reader_maps_pods_to_generic_jobs(tmp_path: Path) -> None:
    """Pods become generic jobs: GPU share of the given memory, bounded lifetime, QoS class."""
    rows = read_alibaba_pods(write(tmp_path, "pods.csv", ALIBABA_TEXT), gpu_memory_mb=80000)
    assert len(rows) == 4  # the pod without GPUs is skipped
    assert [row.timestamp_s for row in rows] == [0.0, 60.0, 100.0, 200.0]
    assert [row.gpu_memory_mb for row in rows] == [80000, 40000, 80000, 20000]
    assert [row.gpu_count for row in rows] == [1, 1, 2, 1]
    longest = ALIBABA_MAX_DURATION_S
    assert [row.duration_s for row in rows] == [600.0, 1.0, longest, longest]
    assert [row.priority for row in rows] == ["high", "batch", "normal", None]
    assert {row.model for row in rows} == {"generic"}


def test_generic_reader_reads_csv_and_jsonl_with_defaults(tmp_path: Path) -> None:
    """Generic CSV and JSON Lines give the same rows; missing fields stay unset (defaults)."""
    csv_path = write(
        tmp_path,
        "trace.csv",
        "timestamp_s,user,input_tokens,output_tokens,gpu_count\n10.5,alice,100,20,\n12,,,,2\n",
    )
    jsonl_path = write(
        tmp_path,
        "trace.jsonl",
        '{"timestamp_s": 10.5, "user": "alice", "input_tokens": 100, "output_tokens": 20}\n'
        "\n"
        '{"timestamp_s": 12, "gpu_count": 2}\n',
    )
    expected = [
        TraceRow(0.0, user="alice", input_tokens=100, output_tokens=20),
        TraceRow(1.5, gpu_count=2),
    ]
    assert read_generic(csv_path) == expected
    assert read_generic(jsonl_path) == expected


def test_format_is_detected_from_the_header(tmp_path: Path) -> None:
    """Auto-detection tells the three formats apart and refuses an unknown header."""
    assert detect_format(write(tmp_path, "a.csv", AZURE_TEXT)) == "azure"
    assert detect_format(write(tmp_path, "b.csv", ALIBABA_TEXT)) == "alibaba"
    assert detect_format(write(tmp_path, "c.csv", "timestamp_s,user\n1,bob\n")) == "generic"
    assert detect_format(write(tmp_path, "d.jsonl", '{"timestamp_s": 1}\n')) == "generic"
    assert len(read_trace(write(tmp_path, "e.csv", ALIBABA_TEXT))) == 4
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        read_trace(write(tmp_path, "f.csv", "when,what\n1,2\n"))


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.csv", AZURE_TEXT.replace("109", "many"), "line 3: column 'GeneratedTokens'"),
        ("bad2.csv", AZURE_TEXT.replace("18:15:46", "yesterday"), "line 2: column 'TIMESTAMP'"),
        ("bad3.csv", "timestamp_s,input_tokens\n1,5\n2,-3\n", "line 3: column 'input_tokens'"),
        ("bad4.csv", "timestamp_s,colour\n1,red\n", "line 2: column 'colour'"),
        ("bad5.jsonl", '{"timestamp_s": 1}\n{"user": "x"}\n', "line 2: column 'timestamp_s'"),
        ("bad6.jsonl", '{"timestamp_s": 1, "gpu_count": 0}\n', "line 1: column 'gpu_count'"),
        ("bad7.jsonl", '{"timestamp_s": 1}\n[1, 2]\n', "line 2: expected a JSON object"),
        (
            "bad8.csv",
            ALIBABA_TEXT.replace(",1,250,", ",1,2500,"),
            "line 6: column 'gpu_milli'",
        ),
    ],
)
def test_malformed_rows_name_line_and_column(
    tmp_path: Path, name: str, text: str, where: str
) -> None:
    """A malformed row is refused with the file, the line and the column at fault."""
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(path) in str(caught.value)
    assert where in str(caught.value)


# Users and the fleet ---------------------------------------------------------------------------


def test_users_are_assigned_deterministically_and_skewed() -> None:
    """Users depend only on row index, count and seed; the first user is the heaviest."""
    rows = [TraceRow(float(i)) for i in range(4000)]
    first = assign_users(rows, users=16, seed=7)
    assert first == assign_users(rows, users=16, seed=7)
    assert first != assign_users(rows, users=16, seed=8)
    assert first[:100] == assign_users(rows[:100], users=16, seed=7)  # --limit keeps them
    assert [user_of(i, users=16, seed=7) for i in (0, 1, 2, 3999)] == [
        first[0],
        first[1],
        first[2],
        first[3999],
    ]
    counts = Counter(first)
    assert set(counts) <= {f"u{k:02d}" for k in range(1, 17)}
    assert counts.most_common(1)[0][0] == "u01"
    assert 0.25 < counts["u01"] / len(rows) < 0.35  # Zipf(1) over 16 users: 29.6%
    assert assign_users([TraceRow(0.0, user="carol")], users=4) == ["carol"]


def test_gpus_option_is_parsed_and_checked() -> None:
    """``NxTYPE[,NxTYPE]`` gives the fleet; malformed counts and unknown types are refused."""
    fleet = parse_gpus("8xH100-80GB, 2xA100-80GB")
    assert fleet == Fleet((("H100-80GB", 8), ("A100-80GB", 2)))
    assert fleet.gpu_count == 10
    assert fleet.memory_mb == 8 * 81559 + 2 * 81920
    assert str(fleet) == "8xH100-80GB,2xA100-80GB"
    for bad in ("H100-80GB", "xH100-80GB", "0xH100-80GB", "2xB300", "2x"):
        with pytest.raises(ValueError, match=r"NxTYPE|at least 1|unknown GPU type"):
            parse_gpus(bad)


# Metrics ---------------------------------------------------------------------------------------


def test_percentile_and_jain_index() -> None:
    """Percentiles interpolate linearly; Jain is 1 for equal shares and 1/n for one taker."""
    assert percentile([], 99) == 0.0
    assert percentile([5.0], 50) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([]) == 1.0


def test_metrics_of_a_hand_made_run() -> None:
    """Waits, latency, SLO, memory utilisation, OOMs, fairness and throughput from records."""
    records = [
        # Holds half of the fleet's memory for the whole makespan (0 .. 10 s).
        record("a", user="u01", created=0.0, started=0.0, finished=10.0, memory=30000),
        # Waited 4 s, ran 2 s, after one out-of-memory retry.
        record(
            "b",
            user="u02",
            created=1.0,
            started=5.0,
            finished=7.0,
            wait=4.0,
            retried=("gpu_out_of_memory",),
        ),
        # Gave up after running out of memory twice.
        record(
            "c",
            user="u02",
            status="failed",
            created=2.0,
            started=None,
            finished=3.0,
            wait=1.0,
            error="gpu_out_of_memory",
            retried=("gpu_out_of_memory",),
        ),
    ]
    report = SimulationReport(records, [Rejection(0.5, "u03", "quota", "no")], 10.0, 0)
    metrics, waits = summarize(
        report, {"a": 40000, "b": 0, "c": 0}, fleet_memory_mb=80000, slo_s=9.0
    )
    assert waits == [0.0, 4.0, 1.0]
    assert metrics["p50_queue_wait_s"] == 1.0
    assert metrics["p90_queue_wait_s"] == pytest.approx(3.4)  # 1 + 0.8 × (4 − 1)
    assert metrics["p999_queue_wait_s"] == pytest.approx(3.994)
    assert metrics["p50_latency_s"] == pytest.approx(8.0)  # latencies 10 and 6
    assert metrics["p99_latency_s"] == pytest.approx(9.96)
    assert metrics["slo_attainment"] == 0.25  # only b, out of 4 submitted
    assert metrics["gpu_memory_utilization"] == pytest.approx(0.5)
    assert metrics["gpu_memory_reserved_utilization"] == pytest.approx(
        30000 * 10 / 800000 + 1000 * 2 / 800000
    )
    assert metrics["oom_events"] == 3
    assert metrics["completed"] == 2
    assert metrics["failed"] == 1
    assert metrics["rejected"] == 1
    assert metrics["makespan_s"] == pytest.approx(10.0)
    assert metrics["throughput_rps"] == pytest.approx(0.2)
    # Bounded slowdowns: u01 10/10 = 1, u02 6/2 = 3.
    assert metrics["jain_fairness"] == pytest.approx(16 / (2 * 10))


def test_equal_users_are_perfectly_fair() -> None:
    """Users whose requests are slowed down alike give a Jain index of 1."""
    records = [
        record(f"r{i}", user=f"u{i % 4}", created=float(i), started=i + 1.0, finished=i + 3.0)
        for i in range(8)
    ]
    metrics, _ = summarize(
        SimulationReport(records, [], 11.0, 0), {}, fleet_memory_mb=1, slo_s=30.0
    )
    assert metrics["jain_fairness"] == pytest.approx(1.0)
    assert metrics["slo_attainment"] == 1.0


# Replays ---------------------------------------------------------------------------------------


def _short_and_clipped() -> tuple[Fleet, Settings, list[TraceRow]]:
    """One H100 under balanced, and two rows: one that fits the context, one cut by it."""
    fleet = parse_gpus("1xH100-80GB")
    rows = [
        TraceRow(0.0, input_tokens=1000, output_tokens=1000),
        TraceRow(1.0, input_tokens=8000, output_tokens=1000),
    ]
    return fleet, replay_settings(fleet, "balanced"), rows


def test_rows_carry_their_truth_and_the_router_sees_only_the_prompt() -> None:
    """The router gets the prompt and no max_tokens; the simulated GPU gets the true shape."""
    fleet, settings, rows = _short_and_clipped()
    short, clipped = plan_rows(rows, settings, fleet, load_scale=2.0)
    assert short.at == 0.0 and clipped.at == 0.5
    assert "max_tokens" not in short.submission.input
    assert short.submission.task is Task.CHAT
    kv_mb = 131072 / 2**20  # llama-3-8b: 128 KiB of KV cache per token
    assert short.peak_memory_mb == 15317 + round(2000 * kv_mb)
    assert short.duration_s == pytest.approx(1000 / 12000 + 1000 / 90)
    assert not short.clipped
    assert clipped.clipped  # 8000 + 1000 tokens exceed the 8192-token context
    assert clipped.peak_memory_mb == 15317 + round(8192 * kv_mb)
    assert clipped.duration_s == pytest.approx(8000 / 12000 + 192 / 90)


def test_known_output_sends_the_true_answer_length_as_max_tokens() -> None:
    """With known_output the router's shape is the one that runs: max_tokens = true output."""
    fleet, settings, rows = _short_and_clipped()
    short, clipped = plan_rows(rows, settings, fleet, known_output=True)
    assert short.submission.input["max_tokens"] == 1000
    assert clipped.submission.input["max_tokens"] == 192  # cut to the context left
    assert short.duration_s == plan_rows(rows, settings, fleet)[0].duration_s


def test_a_scaled_catalog_makes_every_duration_that_many_times_the_truth() -> None:
    """Catalog, datasheet-scaled and roofline throughputs and default durations all scale."""
    fleet = parse_gpus("1xH100-80GB,1xL4-24GB")
    settings = replay_settings(fleet, "balanced")
    wrong = scaled_catalog(settings, fleet, 2.0)
    types = fleet_gpu_types(settings)
    truth = ResourceEstimator(settings.models, types)
    scaled = ResourceEstimator(wrong.models, types)
    assert set(wrong.models) == set(settings.models)
    for model in settings.models:
        shape = Shape(1, 0, 0) if truth.profile(model).task is Task.GENERIC else Shape(2, 300, 40)
        true_durations = truth.estimate(model, shape).duration_s
        for kind, seconds in scaled.estimate(model, shape).duration_s.items():
            assert seconds == pytest.approx(2 * true_durations[kind]), (model, kind)
        assert (
            scaled.estimate(model, shape).gpu_memory_mb
            == truth.estimate(model, shape).gpu_memory_mb
        )
    assert scaled_catalog(settings, fleet, 1.0) is settings


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_a_replay_learns_a_catalog_that_is_wrong_by_a_factor_of_two(scale: float) -> None:
    """Durations 2× too long or too short at first; the learned estimates meet the truth.

    The router knows each answer's length (``known_output``), so the catalog is the only thing
    wrong: an estimate issued before anything was learned is off by |scale − 1| exactly.
    Learning acts within the first tenth of the rows and is done by the second. On fixed GPUs
    the true duration is one figure; shared ones would add their sharing to it.
    """
    rows = read_azure(AZURE_CONV)[:200]
    result = replay(
        rows,
        gpus="2xH100-80GB",
        policy="round_robin",
        catalog_duration_scale=scale,
        known_output=True,
        service="fixed",
    )
    errors = result.metrics["duration_error_by_tenth"]
    assert len(errors) == 10 and result.metrics["completed"] == 200
    assert errors[0] < 0.5 * abs(scale - 1), errors
    assert all(error <= 0.05 for error in errors[1:]), errors
    assert errors[-1] <= 0.001, errors


def test_tiny_replay_is_deterministic() -> None:
    """The same rows, fleet, policy and seed give the same metrics, every time."""
    rows = read_azure(AZURE_CONV)[:200]
    first = replay(rows, gpus="2xH100-80GB", policy="random", seed=3)
    again = replay(rows, gpus="2xH100-80GB", policy="random", seed=3)
    assert first.metrics == again.metrics
    assert first.queue_waits == again.queue_waits
    assert first.metrics["completed"] == 200
    assert set(REQUIRED_METRICS) <= set(first.metrics)


def test_answers_longer_than_assumed_run_out_of_memory_on_a_packed_gpu() -> None:
    """True peaks above the estimates on a full GPU make real out-of-memory failures."""
    # The router estimates ~15.5 GB from the prompt; each really needs 20 GB: five fit by the
    # estimate on one fixed H100 (every execution holds its own weights) but only four in truth.
    rows = [TraceRow(0.0, input_tokens=500, gpu_memory_mb=20000) for _ in range(10)]
    result = replay(rows, gpus="1xH100-80GB", policy="balanced", service="fixed")
    assert result.metrics["oom_events"] > 0
    assert result.metrics["retries"] >= result.metrics["oom_events"] - result.metrics["failed"]
    exact = [TraceRow(0.0, input_tokens=500) for _ in range(10)]
    fits = replay(exact, gpus="1xH100-80GB", policy="balanced", service="fixed")
    assert fits.metrics["oom_events"] == 0


def test_alibaba_pods_replay_as_generic_jobs(tmp_path: Path) -> None:
    """Pods run for their lifetime on the GPU share they asked for; nothing is lost."""
    text = ALIBABA_TEXT.replace(",200,,", ",200,500,").replace("9000000", "1300")
    rows = read_trace(write(tmp_path, "pods.csv", text), gpu_memory_mb=80535)
    result = replay(rows, gpus="4xH100-80GB", policy="best_fit")
    assert result.metrics["completed"] == 4
    assert result.metrics["makespan_s"] == pytest.approx(1300 - 100)
    assert result.metrics["oom_events"] == 0


def test_the_starvation_bound_of_a_replay_is_the_one_asked_for() -> None:
    """A large request behind a steady stream of small ones waits about the bound, no longer.

    Fixed GPUs: the stream's jobs take their second each, however many run.
    """
    small = [
        TraceRow(0.3 * i, model="generic", duration_s=1.0, gpu_memory_mb=20000) for i in range(100)
    ]
    large = TraceRow(1.0, model="generic", duration_s=1.0, gpu_memory_mb=60000)
    rows = sorted([*small, large], key=lambda row: row.timestamp_s)
    waits = {
        bound: max(
            replay(
                rows, gpus="1xH100-80GB", starvation_bound_s=bound, slots=64, service="fixed"
            ).queue_waits
        )
        for bound in (0.5, 1000.0)
    }
    assert waits[0.5] < 3.0  # held after 0.5 s: the GPU drains for it
    assert waits[1000.0] > 20.0  # never held: it waits for the stream to end


def test_models_are_drawn_zipf_over_the_list_the_first_most_often() -> None:
    """Rows naming no model get a seeded Zipf(1) draw over the list; named ones keep theirs."""
    rows = [TraceRow(float(i)) for i in range(3000)] + [TraceRow(0.0, model="named")]
    models = ["a", "b", "c", "d"]
    drawn = assign_models(rows, models, seed=7)
    assert drawn == assign_models(rows, models, seed=7)
    assert drawn != assign_models(rows, models, seed=8)
    assert drawn[-1] == "named"
    counts = Counter(drawn[:-1])
    assert counts["a"] > counts["b"] > counts["c"] > counts["d"] > 0
    share = counts["a"] / 3000  # 1 / (1 + 1/2 + 1/3 + 1/4) = 0.48
    assert 0.44 < share < 0.52
    with pytest.raises(ValueError, match="at least one model"):
        assign_models(rows, [])


def test_on_a_mixed_shared_fleet_balanced_cuts_the_tail_round_robin_leaves() -> None:
    """On a mixed fleet of shared GPUs balanced cuts the tail that round robin leaves.

    Four models on an H100 and an L4: balanced sends work where it finishes first (the faster
    GPU, the weights already there), round robin sends half to the slow GPU and loads models
    there; its p99 latency is far worse, and nothing runs out of memory. On one GPU, the first
    request of a model waits for its weights to load, as a fixed GPU never makes it.
    """
    rows = [
        TraceRow(row.timestamp_s, input_tokens=row.input_tokens, output_tokens=row.output_tokens)
        for row in read_azure(AZURE_CONV)[:300]
    ]
    models = ["llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-3b"]
    results = {
        policy: replay(
            rows,
            gpus="1xH100-80GB,1xL4-24GB",
            policy=policy,
            model=models,
            config=MIXED_CATALOG,
        ).metrics
        for policy in ("balanced", "round_robin")
    }
    assert results["balanced"]["completed"] == results["round_robin"]["completed"] == 300
    assert results["balanced"]["p99_latency_s"] < 0.5 * results["round_robin"]["p99_latency_s"]
    assert results["balanced"]["oom_events"] == 0
    # Where the gain comes from: fewer loads, more of the work on the fast GPU.
    assert results["balanced"]["cold_starts"] < results["round_robin"]["cold_starts"]
    on_h100 = {p: m["completed_by_gpu_type"]["H100-80GB"] for p, m in results.items()}
    assert on_h100["balanced"] > on_h100["round_robin"]
    assert sum(results["round_robin"]["completed_by_gpu_type"].values()) == 300
    fixed = replay(
        rows[:1], gpus="1xH100-80GB", model=models[:1], config=MIXED_CATALOG, service="fixed"
    )
    cold = replay(rows[:1], gpus="1xH100-80GB", model=models[:1], config=MIXED_CATALOG)
    weights_s = 2357 * 2**20 / 1.7e9  # llama-3.2-1b's weights at 1.7 GB/s
    assert cold.metrics["p50_latency_s"] == pytest.approx(
        fixed.metrics["p50_latency_s"] + weights_s, rel=1e-3
    )


# The command -----------------------------------------------------------------------------------


def test_command_writes_json_with_every_metric_and_a_plot(tmp_path: Path) -> None:
    """The CLI replays a slice of the Azure trace per policy and scale, writes JSON and a PNG.

    The JSON carries the provenance of the run: its commit, command line, machine and time.
    """
    out, plot = tmp_path / "out" / "replay.json", tmp_path / "replay.png"
    arguments = ["bench", "replay", "--trace", str(AZURE_CONV), "--limit", "300"]
    arguments += ["--gpus", "2xH100-80GB", "--sweep", "0.5,1", "--json", str(out)]
    result = CliRunner().invoke(app, [*arguments, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "balanced" in result.output and "load sweep" in result.output
    document = json.loads(out.read_text())
    policies = document["policies"]
    assert list(policies) == [
        "balanced",
        "best_fit",
        "least_loaded",
        "power_of_two",
        "round_robin",
        "random",
    ]
    for metrics in policies.values():
        assert set(REQUIRED_METRICS) <= set(metrics)
        assert metrics["completed"] == 300
        assert len(metrics["duration_error_by_tenth"]) == 10
    assert "duration error" in result.output
    assert document["settings"]["catalog_duration_scale"] == 1.0
    assert document["settings"]["known_output"] is False
    assert document["trace"]["format"] == "azure" and document["trace"]["rows"] == 300
    assert document["sweep"]["scales"] == [0.5, 1.0]
    assert document["sweep"]["policies"]["random"]["1"] == policies["random"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert problems(document["provenance"]) == []
    assert document["provenance"]["recorded_after"] is False


def test_command_output_is_the_same_for_the_same_seed(tmp_path: Path) -> None:
    """Two runs of the same command write identical results (the random policies included).

    Only the provenance, which holds the times of each run, may differ.
    """
    documents = []
    for name in ("first.json", "second.json"):
        arguments = ["bench", "replay", "--trace", str(AZURE_CONV), "--limit", "150"]
        arguments += ["--gpus", "1xH100-80GB", "--sweep", "", "--seed", "5"]
        arguments += ["--policy", "random", "--policy", "power_of_two"]
        result = CliRunner().invoke(app, [*arguments, "--json", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        document = json.loads((tmp_path / name).read_text())
        assert problems(document.pop("provenance")) == []
        documents.append(document)
    assert documents[0] == documents[1]
    assert list(documents[0]["policies"]) == ["random", "power_of_two"]
    assert documents[0]["sweep"] == {"scales": [], "policies": {"random": {}, "power_of_two": {}}}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--gpus", "8xB300"], "unknown GPU type"),
        (["--gpus", "eight"], "NxTYPE"),
        (["--policy", "fastest"], "unknown policy"),
        (["--sweep", "1,x"], "not a number"),
        (["--format", "parquet"], "expected one of"),
        (["--starvation-bound-s", "0"], "starvation_bound_s"),
        (["--catalog-duration-scale", "0"], "must be positive"),
    ],
)
def test_command_refuses_bad_options(option: list[str], message: str) -> None:
    """Malformed options exit 2 with a message that says what is wrong."""
    arguments = ["bench", "replay", "--trace", str(AZURE_CONV), "--limit", "10", *option]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_command_reports_a_malformed_trace(tmp_path: Path) -> None:
    """A malformed trace exits 2 naming the line and column."""
    path = write(tmp_path, "bad.csv", "timestamp_s,input_tokens\n1,lots\n")
    result = CliRunner().invoke(app, ["bench", "replay", "--trace", str(path)])
    assert result.exit_code == 2
    assert "line 2: column 'input_tokens'" in " ".join(result.output.split())


def test_the_eta_of_jobs_of_known_length_in_a_line_is_exact() -> None:
    """One GPU, jobs that take it whole for the duration the router expects: each ETA is exact."""
    settings = replay_settings(parse_gpus("1xH100-80GB"), "balanced", service="fixed")
    duration = settings.models["generic"].default_duration_s
    # One user: the queue is first come, first served (between users fair share may reorder it).
    rows = [
        TraceRow(0.0, user="alice", model="generic", duration_s=duration, gpu_memory_mb=60_000)
        for _ in range(4)
    ]
    result = replay(rows, gpus="1xH100-80GB", service="fixed", eta=True)
    eta = result.metrics["eta"]
    assert eta["asked"] == 3 and eta["with_eta"] == 3  # the first starts at once
    assert eta["median_abs_error_s"] == pytest.approx(0.0, abs=1e-6)
    assert eta["p90_abs_error_s"] == pytest.approx(0.0, abs=1e-6)
    assert eta["within_1s"] == 1.0 and eta["within_25pct"] == 1.0
    assert eta["median_actual_wait_s"] == pytest.approx(2 * duration)
    assert eta["blocked_by"] == {"memory": 3}
    assert eta["early_share_of_misses"] is None  # no miss
    assert eta["zero_eta"]["median_abs_error_s"] == pytest.approx(2 * duration)


def test_the_eta_error_shows_when_jobs_run_longer_than_expected() -> None:
    """Jobs twice as long as the router expects: the ETAs come early, and the error says so."""
    settings = replay_settings(parse_gpus("1xH100-80GB"), "balanced", service="fixed")
    duration = settings.models["generic"].default_duration_s
    rows = [
        TraceRow(0.0, user="alice", model="generic", duration_s=2 * duration, gpu_memory_mb=60_000)
        for _ in range(3)
    ]
    eta = replay(rows, gpus="1xH100-80GB", service="fixed", eta=True).metrics["eta"]
    assert eta["with_eta"] == 2
    assert eta["median_error_s"] < -0.2 * duration  # too early a forecast
    assert eta["median_abs_error_s"] > 0.2 * duration
    assert eta["early_share_of_misses"] in (None, 1.0)


def test_the_command_reports_the_eta_per_policy(tmp_path: Path) -> None:
    """With --eta the table and the JSON carry the ETA's error for every policy."""
    out = tmp_path / "replay.json"
    arguments = ["bench", "replay", "--trace", str(AZURE_CONV), "--limit", "200", "--eta"]
    arguments += ["--gpus", "1xH100-80GB", "--sweep", "", "--policy", "balanced"]
    arguments += ["--policy", "best_fit", "--json", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "ETA against the wait" in result.output
    document = json.loads(out.read_text())
    assert document["settings"]["eta"] is True
    for metrics in document["policies"].values():
        eta = metrics["eta"]
        assert eta["asked"] > 0 and eta["with_eta"] <= eta["asked"]
        assert 0 <= eta["median_abs_error_s"] <= eta["p90_abs_error_s"]

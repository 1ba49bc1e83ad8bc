"""The PromQL of deploy/grafana and deploy/prometheus names only metrics the router exports.

Every ``expr`` of the Grafana board (and its ``label_values`` variables) and of the alert rules is
parsed by ``promql-parser`` (a port of Prometheus's own parser: a syntax error or an unknown
function fails), and every metric name its selectors use must be a sample name of the router's
real registry: a counter's ``_total``, a histogram's ``_bucket`` / ``_sum`` / ``_count``, a gauge's
own name. The label names a query uses (in selectors, ``by (...)`` and ``label_replace``) must be
labels of the metrics it reads, as a real scrape of a collector with a series of every metric
writes them (or ``job`` / ``instance``, which Prometheus adds). Label values are not checked, and
no query runs against a Prometheus.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu_request_router.core.metric_collector import MetricCollector
from gpu_request_router.models.gpu_state import GPUReading, GPUState
from gpu_request_router.models.request import Estimate, Placement, Request, RequestStatus, Task

DEPLOY = Path(__file__).parents[3] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "gpurouter.json"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

#: Series Prometheus itself adds to every scrape target (not the router's), and its target labels.
SCRAPE_SERIES = frozenset({"up"})
TARGET_LABELS = frozenset({"job", "instance"})

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Grafana's interval variables stand for a duration; a query ranges over them.
_GRAFANA_INTERVALS = re.compile(r"\$\{?__(rate_interval|interval|range)\b\}?")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_]\w*)\)$")


def exported_names() -> frozenset[str]:
    """The sample names a scrape of the router's registry can hold, by each family's type."""
    registry = CollectorRegistry()
    MetricCollector(registry)
    names: set[str] = set()
    for family in registry.collect():
        assert family.type in _SUFFIXES, f"{family.name}: a {family.type} is not handled here"
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return frozenset(names)


@functools.cache
def exported_labels() -> dict[str, frozenset[str]]:
    """Sample name -> its label names, from a real scrape once every metric has a series."""
    registry = CollectorRegistry()
    collector = MetricCollector(registry)
    request = Request(
        id="r1",
        user="alice",
        model="llama",
        task=Task.CHAT,
        priority="normal",
        estimate=Estimate(
            gpu_memory_mb=1, weights_mb=0, kv_cache_mb=1, activations_mb=0, duration_s={"x": 1.0}
        ),
        created_at=0.0,
    )
    request.transition(RequestStatus.DISPATCHING, 1.0, placement=Placement("w", ("w:0",)))
    collector.request_dispatched(request, 1.0)
    request.transition(RequestStatus.RUNNING, 2.0)
    request.transition(RequestStatus.SUCCEEDED, 3.0, result={})
    collector.request_finished(request, 3.0)
    collector.request_rejected("quota", "alice")
    collector.retry("backend", "alice")
    collector.set_queue_depth({"normal": 1})
    collector.decision(0.001)
    collector.estimate_error("llama", "duration", 1.0)
    collector.set_gpus_held(0)
    collector.circuit("w", is_open=False)
    reading = GPUReading(
        worker="w", index=0, type="H100-80GB", memory_total_mb=81559, memory_used_mb=1
    )
    collector.gpu(GPUState(reading=reading, last_seen=0.0))
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(names) for name, names in labels.items()}


def unknown_labels(expr: str) -> list[str]:
    """Label names the query uses that the metrics it reads do not carry."""
    labels = exported_labels()
    problems: list[str] = []

    def available(node: Any) -> set[str]:
        """Labels the series of a subtree can carry: its metrics', target and replaced ones."""
        found = set(TARGET_LABELS)

        def visit(inner: Any) -> bool:
            if isinstance(inner, promql_parser.VectorSelector) and inner.name:
                found.update(labels.get(inner.name, ()))
            if isinstance(inner, promql_parser.Call) and inner.func.name == "label_replace":
                found.add(inner.args[1].val)
            return True

        promql_parser.walk(node, visit)
        return found

    def check(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            groups = [node.matchers.matchers, *node.matchers.or_matchers]
            used = {m.name for group in groups for m in group} - {"__name__"}
            problems.extend(sorted(used - available(node)))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            problems.extend(sorted(set(node.modifier.labels) - available(node.expr)))
        elif isinstance(node, promql_parser.Call) and node.func.name == "label_replace":
            problems.extend(sorted({node.args[3].val} - available(node.args[0])))
        return True

    promql_parser.walk(promql_parser.parse(_GRAFANA_INTERVALS.sub("5m", expr)), check)
    return problems


def metric_names(expr: str) -> set[str]:
    """The metric names the selectors of one PromQL expression use (it must parse)."""
    tree = promql_parser.parse(_GRAFANA_INTERVALS.sub("5m", expr))
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                equal = [
                    m.value
                    for m in node.matchers.matchers
                    if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
                ]
                assert equal, f"a selector without a metric name in {expr!r}"
                name = equal[0]
            names.add(name)
        return True

    promql_parser.walk(tree, visit)
    return names


def dashboard_exprs(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every target of every panel (rows included) and query variable."""
    panels = list(board["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        found = _LABEL_VALUES.match(query)
        assert found, f"variable {variable['name']}: only label_values(selector, label) is checked"
        yield f"variable {variable['name']}", found["selector"]


def alert_exprs(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every rule of every group."""
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def unknown_names(exprs: list[tuple[str, str]]) -> list[str]:
    """``where: name`` for each metric name that neither the router nor a scrape exports."""
    known = exported_names() | SCRAPE_SERIES
    return [
        f"{where}: {name}" for where, expr in exprs for name in sorted(metric_names(expr) - known)
    ]


def test_labels_come_from_a_series_of_every_metric() -> None:
    """Every exported name has a series in the populated scrape, with the labels documented."""
    labels = exported_labels()
    assert exported_names() <= labels.keys()
    assert labels["gpurouter_queue_wait_seconds_bucket"] == {"priority", "le"}
    assert labels["gpurouter_requests_total"] == {"status", "priority", "model"}


@pytest.mark.parametrize(
    ("expr", "wrong"),
    [
        ('gpurouter_gpu_healthy{gpus="w:0"}', ["gpus"]),
        ("sum by (class) (gpurouter_queue_depth)", ["class"]),
        ('label_replace(gpurouter_circuit_open, "w", "$1", "gpu", "(.+)")', ["gpu"]),
        (
            'max by (worker) (label_replace(gpurouter_gpu_healthy, "worker", "$1", "gpu", "(.+)"))',
            [],
        ),
        ('sum by (job) (up{instance="x"})', []),
    ],
)
def test_unknown_labels_are_found(expr: str, wrong: list[str]) -> None:
    """A label the metric lacks, in a selector, a grouping or label_replace's source, is found."""
    assert unknown_labels(expr) == wrong


def test_exported_names_match_a_real_scrape() -> None:
    """The suffix rules give exactly the names the text exposition writes (unlabelled series)."""
    registry = CollectorRegistry()
    MetricCollector(registry)
    scraped = {
        sample.name
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    assert scraped, "no unlabelled series to compare with"
    assert scraped <= exported_names()
    assert "gpurouter_dispatch_decision_seconds_bucket" in scraped
    assert "gpurouter_gpus_held" in scraped


class TestDashboard:
    def test_every_expression_names_exported_metrics(self) -> None:
        """Each query parses, and each metric it names is one the router exports."""
        exprs = list(dashboard_exprs(json.loads(DASHBOARD.read_text())))
        assert len(exprs) >= 20
        assert unknown_names(exprs) == []
        assert [(where, unknown_labels(e)) for where, e in exprs if unknown_labels(e)] == []

    def test_covers_every_exported_metric(self) -> None:
        """Each metric the router exports appears on the board (under one of its sample names)."""
        used = set().union(
            *(metric_names(e) for _, e in dashboard_exprs(json.loads(DASHBOARD.read_text())))
        )
        registry = CollectorRegistry()
        MetricCollector(registry)
        missing = [
            family.name
            for family in registry.collect()
            if not any(family.name + suffix in used for suffix in _SUFFIXES[family.type])
        ]
        assert missing == []

    def test_a_planted_wrong_name_fails(self) -> None:
        """A misspelt metric (a gauge given a counter's suffix) in one target is reported."""
        board = json.loads(DASHBOARD.read_text())
        board["panels"][1]["targets"][0]["expr"] = "sum(gpurouter_queue_depth_total)"
        problems = unknown_names(list(dashboard_exprs(board)))
        assert problems == [
            f"panel {board['panels'][1]['title']!r} target A: gpurouter_queue_depth_total"
        ]

    def test_panel_ids_are_unique(self) -> None:
        """Grafana keys panels by id: two panels with one id lose one of them on save."""
        ids = [panel["id"] for panel in json.loads(DASHBOARD.read_text())["panels"]]
        assert len(ids) == len(set(ids))


class TestPrometheus:
    def test_scrape_config_scrapes_metrics_and_loads_the_alerts(self) -> None:
        """The scrape job reads /metrics, and the rule file it names is the one beside it."""
        config = yaml.safe_load(SCRAPE.read_text())
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "gpurouter"
        assert job["metrics_path"] == "/metrics"
        assert [(SCRAPE.parent / f).resolve() for f in config["rule_files"]] == [ALERTS.resolve()]
        assert "metrics_require_auth" in SCRAPE.read_text()

    def test_every_alert_names_exported_metrics(self) -> None:
        """Each rule parses, names only exported metrics (or ``up``), waits and says what it is."""
        rules = yaml.safe_load(ALERTS.read_text())
        exprs = list(alert_exprs(rules))
        assert unknown_names(exprs) == []
        assert [(where, unknown_labels(e)) for where, e in exprs if unknown_labels(e)] == []
        for group in rules["groups"]:
            for rule in group["rules"]:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert rule["annotations"]["summary"], rule["alert"]

    def test_the_issue_s_alerts_are_there(self) -> None:
        """Queue wait, GPU unhealthy, worker lost and error rate each have a rule."""
        rules = yaml.safe_load(ALERTS.read_text())
        alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
        assert {
            "GpuRouterQueueWaitHigh",
            "GpuRouterGpuUnhealthy",
            "GpuRouterWorkerLost",
            "GpuRouterErrorRateHigh",
        } <= alerts

    def test_a_planted_wrong_name_fails(self) -> None:
        """A counter without its ``_total`` suffix (its family name) is not a sample name."""
        rules = yaml.safe_load(ALERTS.read_text())
        rules["groups"][0]["rules"][0]["expr"] = "rate(gpurouter_retries[5m]) > 1"
        problems = unknown_names(list(alert_exprs(rules)))
        assert problems == [f"rule {rules['groups'][0]['rules'][0]['alert']}: gpurouter_retries"]

    @pytest.mark.parametrize("expr", ["rate(gpurouter_retries_total[5m)", "nofunc(up)"])
    def test_a_query_that_does_not_parse_fails(self, expr: str) -> None:
        """A syntax error or an unknown function is an error, not an empty set of names."""
        with pytest.raises(ValueError, match=r"unexpected|unknown function"):
            metric_names(expr)

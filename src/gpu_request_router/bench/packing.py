"""``gpurouter bench packing``: the FGD paper's packing protocol on the Alibaba GPU cluster trace.

Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with Fragmentation
Gradient Descent" (USENIX ATC 2023) evaluate placement policies with a Kubernetes scheduler
simulator (hkust-adsl/kubernetes-scheduler-simulator) on the Alibaba ``openb`` trace: 1,213 GPU
nodes (6,212 GPUs) and 8,152 pods, each needing CPU, memory and either whole GPUs, a fraction
(``gpu_milli``) of one GPU, or no GPU. This module is a pure-Python re-implementation of what
their published numbers depend on, so that our own placement idea can be measured the same way:

- **Arrivals** (the simulator's workload tuning with ``--shuffle-pod=true``, ``-tune 1.3``): the
  trace's pods in random order (seeded), then pods sampled with replacement from the trace until
  the arrived GPU demand would pass ``max_load`` % of the cluster's GPUs. Nothing departs. Pods
  that fit nowhere are counted as arrived and skipped. ``order="creation"`` keeps the trace order.
- **Feasibility** (kube-scheduler's NodeResourcesFit plus the simulator's GPU-share filter): the
  node has the CPU and memory left; a GPU pod needs a node whose model is in its ``gpu_spec``
  (``"V100M16|V100M32"``; empty: any) and ``num_gpu`` fully free GPUs, or, for a fraction, one
  GPU with ``gpu_milli`` left. A fractional pod lives on one GPU of the node.
- **Policies**: ``random`` (a feasible node uniformly, a random fitting GPU), ``bestfit`` (the
  simulator's BestFit: per node ``int(100 · (1 − (½·cpu_left/max_cpu + ½·gpu_left/max_gpu)))``
  after placement, the highest wins; a fraction goes to the tightest GPU of the node), ``fgd``
  (Fragmentation Gradient Descent: the node, and GPU, whose expected fragmentation grows least),
  and ``ours`` (the router's fragmentation-aware fit, :mod:`gpu_request_router.core.fragmentation`,
  with the request mix learnt online, see :data:`POLICY_DESCRIPTIONS`). Score ties go to
  the first node of a random node order drawn per run: the simulator prefixes node names with a
  random permutation and its scheduler breaks ties by the smallest name.
- **Metrics** (the artifact's ``analysis.py`` and ``merge_*_discrete.py``): after every arrival,
  the allocated GPU milli and the cluster's fragmentation amount; the value at ``x`` % arrived
  load is the mean over the arrivals whose arrived demand rounds to ``x`` % of capacity (the
  neighbouring points when none does). Allocation: allocated GPU milli / capacity. Fragmentation:
  FGD's fragmentation amount (idle GPU milli that the trace's typical pods cannot use) / capacity.

Pure Python and fast enough: per arrival one pass over the nodes with per-node arrays; the
fragmentation of a node state is memoised, so FGD costs a dictionary look-up per node. Runs
(policy × seed) are independent and go to a process pool.
"""

from __future__ import annotations

import csv
import math
import os
import random
import statistics
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gpu_request_router.bench.provenance import capture
from gpu_request_router.bench.report import write_json
from gpu_request_router.core.fragmentation import Demand, RequestMix, cost_bucket, fragmentation

__all__ = [
    "PAPER_ALLOCATION_AT_100",
    "POLICY_DESCRIPTIONS",
    "POLICY_NAMES",
    "Node",
    "Packing",
    "PackingReport",
    "Pod",
    "ReferenceCurves",
    "SeedRun",
    "TypicalPod",
    "arrival_sequence",
    "command",
    "discretize",
    "load_nodes",
    "load_pods",
    "load_reference",
    "node_ranks",
    "pack",
    "run_benchmark",
    "simulate",
    "typical_pods",
    "write_plot",
]

MILLI = 1000
FIRST_SEED = 42  # the artifact's seeds are 42..51
TYPICAL_POD_PERCENT = 95  # the artifact's --pod-popularity-threshold
REFRESH_EVERY = 512  # arrivals between two refreshes of ours' learnt request mix

POLICY_NAMES: tuple[str, ...] = ("random", "bestfit", "fgd", "ours")

POLICY_DESCRIPTIONS: Mapping[str, str] = {
    "random": "the paper's Random: a feasible node uniformly at random, a random fitting GPU",
    "bestfit": (
        "the paper's BestFit: least ½ free CPU/max CPU + ½ free GPU/max GPU after placement, "
        "in whole points; a fraction goes to the tightest GPU"
    ),
    "fgd": (
        "the paper's FGD: the node and GPU whose fragmentation amount grows least "
        "(sigmoid of the change, in whole points)"
    ),
    "ours": (
        "the router's fragmentation-aware fit (core/fragmentation.py): FGD's fragmentation "
        "growth under the request mix learnt from the arrivals so far, in buckets of 7 % of a "
        "GPU; ties to the tightest fit (a fraction: the fullest GPU that fits; else the node with "
        "the least free GPU), then the run's node order"
    ),
}

#: The paper's names for the policies we re-implement.
PAPER_NAMES: Mapping[str, str] = {"random": "Random", "bestfit": "BestFit", "fgd": "FGD"}

#: The paper's published GPU allocation (%) at 100 % arrived load, mean of 10 seeds.
PAPER_ALLOCATION_AT_100: Mapping[str, float] = {
    "Random": 86.30,
    "DotProd": 90.62,
    "GpuClustering": 91.65,
    "GpuPacking": 91.78,
    "BestFit": 92.86,
    "FGD": 95.23,
}

_PAPER_COLOURS: Mapping[str, str] = {
    "Random": "tab:red",
    "DotProd": "tab:orange",
    "GpuClustering": "tab:brown",
    "GpuPacking": "tab:gray",
    "BestFit": "tab:blue",
    "FGD": "tab:green",
}
_COLOURS: Mapping[str, str] = {
    "random": "tab:red",
    "bestfit": "tab:blue",
    "fgd": "tab:green",
    "ours": "tab:purple",
}


# ---------------------------------------------------------------------------------------------
# The trace


@dataclass(frozen=True, slots=True)
class Node:
    """A node of the cluster: CPU (milli), memory (MiB), its GPUs and their model."""

    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str


@dataclass(frozen=True, slots=True)
class Pod:
    """A pod: CPU and memory, and ``num_gpu`` GPUs of ``gpu_milli`` each (a fraction when < 1000).

    A CPU-only pod has ``num_gpu == 0`` and ``gpu_milli == 0``. ``gpu_spec`` lists the GPU models
    it accepts (empty: any).
    """

    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int
    gpu_spec: tuple[str, ...] = ()
    creation_time: float = 0.0

    @property
    def total_milli(self) -> int:
        """The GPU demand: ``num_gpu × gpu_milli``."""
        return self.num_gpu * self.gpu_milli


def _read_rows(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in required if name not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _int(value: str | None, default: int = 0) -> int:
    if value is None or value.strip() == "":
        return default
    return int(float(value))


def load_nodes(path: Path) -> list[Node]:
    """The nodes of a ``sn,cpu_milli,memory_mib,gpu,model`` CSV, in file order."""
    rows = _read_rows(path, ("sn", "cpu_milli", "memory_mib", "gpu"))
    nodes = [
        Node(
            name=row["sn"],
            cpu_milli=_int(row["cpu_milli"]),
            memory_mib=_int(row["memory_mib"]),
            gpus=_int(row["gpu"]),
            model=(row.get("model") or "").strip(),
        )
        for row in rows
    ]
    if not nodes:
        raise ValueError(f"{path}: no nodes")
    return nodes


def load_pods(path: Path) -> list[Pod]:
    """The pods of an Alibaba ``openb`` pod CSV, in file order.

    Columns ``name,cpu_milli,memory_mib,num_gpu`` are required; ``gpu_milli`` (default 1000, capped
    at 1000), ``gpu_spec`` (models separated by ``|``) and ``creation_time`` are optional, as in
    the simulator's converter. A pod with no GPUs, or with ``gpu_milli`` 0, needs no GPU.
    """
    rows = _read_rows(path, ("name", "cpu_milli", "memory_mib", "num_gpu"))
    pods = []
    for row in rows:
        num_gpu = _int(row["num_gpu"])
        gpu_milli = min(_int(row.get("gpu_milli"), MILLI), MILLI) if num_gpu > 0 else 0
        if gpu_milli <= 0:
            num_gpu, gpu_milli = 0, 0
        if num_gpu > 1 and gpu_milli < MILLI:
            raise ValueError(f"{path}: pod {row['name']} shares more than one GPU")
        spec = tuple(model for model in (row.get("gpu_spec") or "").split("|") if model)
        pods.append(
            Pod(
                name=row["name"],
                cpu_milli=_int(row["cpu_milli"]),
                memory_mib=_int(row["memory_mib"]),
                num_gpu=num_gpu,
                gpu_milli=gpu_milli,
                gpu_spec=spec if num_gpu else (),
                creation_time=float(row.get("creation_time") or 0),
            )
        )
    if not pods:
        raise ValueError(f"{path}: no pods")
    return pods


def arrival_sequence(
    pods: Sequence[Pod],
    capacity_milli: int,
    rng: random.Random,
    max_load_pct: float = 130,
    order: str = "shuffle",
) -> list[Pod]:
    """The pods that arrive, in order: the trace, then samples until ``max_load_pct`` % demand.

    ``order="shuffle"`` (the artifact's ``--shuffle-pod=true``) sorts the trace by name and
    shuffles it; ``"creation"`` keeps creation order. Then, as the simulator's workload tuning
    does, pods drawn with replacement from the trace are appended while the arrived GPU demand
    plus the drawn pod's per-GPU request stays within the target (so a multi-GPU pod may overshoot
    it a little); a trace above the target loses pods drawn at random instead.
    """
    if order not in ("shuffle", "creation"):
        raise ValueError(f"unknown arrival order {order!r}")
    by_name = sorted(pods, key=lambda pod: pod.name)
    if order == "shuffle":
        sequence = list(by_name)
        rng.shuffle(sequence)
    else:
        sequence = sorted(pods, key=lambda pod: (pod.creation_time, pod.name))
    target = max_load_pct / 100 * capacity_milli
    total = sum(pod.total_milli for pod in sequence)
    if total > target:
        while sequence and total > target:
            total -= sequence.pop(rng.randrange(len(sequence))).total_milli
        return sequence
    if not any(pod.gpu_milli for pod in by_name):
        return sequence  # sampling could never reach the target
    draw = rng.randrange
    while True:
        pod = by_name[draw(len(by_name))]
        if total + pod.gpu_milli > target:
            return sequence
        total += pod.total_milli
        sequence.append(pod)


# ---------------------------------------------------------------------------------------------
# FGD's fragmentation measure


@dataclass(frozen=True, slots=True)
class TypicalPod:
    """A pod shape of the trace and its share among the typical ones (the FGD workload model)."""

    cpu_milli: int
    gpu_milli: int
    num_gpu: int
    gpu_spec: str
    share: float


def typical_pods(pods: Sequence[Pod], percent: int = TYPICAL_POD_PERCENT) -> list[TypicalPod]:
    """The most frequent pod shapes covering ``percent`` % of the pods, shares renormalised.

    Shapes are (CPU, GPU milli, GPU count, GPU models); ordered by count, ties by the larger
    shape, as the simulator's ``GetTypicalPods`` does with CPU-only pods included.
    """
    counts: dict[tuple[int, int, int, str], int] = {}
    for pod in pods:
        key = (pod.cpu_milli, pod.gpu_milli, pod.num_gpu, "|".join(pod.gpu_spec))
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (item[1], item[0]), reverse=True)
    total = len(pods)
    expected = percent * total / 100
    chosen: list[tuple[tuple[int, int, int, str], int]] = []
    cumulative = 0
    for item in ranked:
        if cumulative >= expected:
            break
        chosen.append(item)
        cumulative += item[1]
    scale = 1.0 if len(chosen) == len(ranked) else cumulative / total
    return [
        TypicalPod(cpu, milli, num, spec, count / total / scale)
        for (cpu, milli, num, spec), count in chosen
    ]


class _FragModel:
    """FGD's fragmentation amount of a node state, memoised.

    For each typical pod (share ``p``): a CPU-only pod, a pod the node's model cannot serve, a
    pod whose GPUs do not fit, or whose CPU does not, counts all idle GPU milli of the node as
    fragment; a pod that fits counts the GPUs too small for it. The amount is the share-weighted
    sum (``NodeGpuShareFragAmount``, all quadrants but "satisfied"). A node state is its model,
    how many typical CPU requests its free CPU meets (its *rank*) and its GPUs' free milli.
    """

    def __init__(self, typical: Sequence[TypicalPod], models: Sequence[str]) -> None:
        self.thresholds = sorted({pod.cpu_milli for pod in typical if pod.gpu_milli > 0})
        self.models = list(models)
        self._rows = [
            (
                pod.share,
                pod.gpu_milli,
                pod.num_gpu,
                self.thresholds.index(pod.cpu_milli) if pod.gpu_milli > 0 else -1,
                frozenset(pod.gpu_spec.split("|")) if pod.gpu_spec else None,
            )
            for pod in typical
        ]
        self._amounts: dict[tuple[int, int, tuple[int, ...]], float] = {}
        self._state_ids: dict[tuple[int, int, tuple[int, ...]], int] = {}
        self.states: list[tuple[int, int, tuple[int, ...]]] = []
        self.state_amounts: list[float] = []
        self.scores: dict[tuple[int, int], dict[tuple[int, int], tuple[int, tuple[int, ...]]]] = {}

    def rank(self, cpu_left: int) -> int:
        """How many typical CPU requests ``cpu_left`` meets."""
        return bisect_right(self.thresholds, cpu_left)

    def amount(self, model: int, rank: int, left: tuple[int, ...]) -> float:
        """The fragmentation amount (GPU milli) of a node state; ``left`` sorted ascending.

        The router's own measure (:func:`~gpu_request_router.core.fragmentation.fragmentation`)
        under the trace's typical pods.
        """
        key = (model, rank, left)
        found = self._amounts.get(key)
        if found is not None:
            return found
        model_name = self.models[model]
        found = fragmentation(
            left,
            [
                Demand(milli, count, share, (spec is None or model_name in spec) and cpu < rank)
                for share, milli, count, cpu, spec in self._rows
            ],
        )
        self._amounts[key] = found
        return found

    def state_id(self, model: int, cpu_left: int, left: tuple[int, ...]) -> int:
        """The id of a node state (interned), its amount in :attr:`state_amounts`."""
        key = (model, self.rank(cpu_left), left)
        found = self._state_ids.get(key)
        if found is None:
            found = len(self.states)
            self._state_ids[key] = found
            self.states.append(key)
            self.state_amounts.append(self.amount(*key))
        return found

    def fgd_score(
        self, state: int, rank_after: int, gpu_milli: int, num_gpu: int
    ) -> tuple[int, tuple[int, ...]]:
        """FGD's score for a pod on a node state, and the GPU free-milli values it would pick.

        ``int(100 · sigmoid((before − after) / 1000))``; a fraction tries each distinct GPU value
        (the simulator keeps the first GPU with the best score).
        """
        model, _, left = self.states[state]
        before = self.state_amounts[state]
        if num_gpu == 0:
            return _sigmoid_score(before - self.amount(model, rank_after, left)), ()
        if gpu_milli >= MILLI:
            after = (0,) * num_gpu + left[: len(left) - num_gpu]
            return _sigmoid_score(before - self.amount(model, rank_after, after)), ()
        best, values = -1, tuple[int, ...]()
        for index in range(bisect_left(left, gpu_milli), len(left)):
            value = left[index]
            if index > 0 and left[index - 1] == value:
                continue
            changed = list(left)
            changed[index] = value - gpu_milli
            changed.sort()
            score = _sigmoid_score(before - self.amount(model, rank_after, tuple(changed)))
            if score > best:
                best, values = score, (value,)
            elif score == best:
                values += (value,)
        return best, values


def _sigmoid_score(drop: float) -> int:
    return int(1.0 / (1.0 + math.exp(-drop / 1000)) * 100)


# ---------------------------------------------------------------------------------------------
# The cluster and the policies


class _Cluster:
    """Per-node free CPU, memory and GPU milli as plain lists, for tight loops."""

    def __init__(self, nodes: Sequence[Node], frag: _FragModel, rank: Sequence[int]) -> None:
        models = frag.models
        self.rank = list(rank)
        self.frag = frag
        self.model = [models.index(node.model) for node in nodes]
        self.model_name = [node.model for node in nodes]
        self.cpu_left = [node.cpu_milli for node in nodes]
        self.mem_left = [node.memory_mib for node in nodes]
        self.gpus = [[MILLI] * node.gpus for node in nodes]
        self.sorted_left = [tuple(gpus) for gpus in self.gpus]
        self.total_left = [node.gpus * MILLI for node in nodes]
        self.full_free = [node.gpus for node in nodes]
        self.max_left = [MILLI if node.gpus else 0 for node in nodes]
        self.max_cpu = max(node.cpu_milli for node in nodes) or 1
        self.max_gpu = max(node.gpus for node in nodes) * MILLI or 1
        self.fit_key = [self._fit_key(i) for i in range(len(nodes))]
        self.all_nodes = list(range(len(nodes)))
        self.gpu_nodes = [i for i, node in enumerate(nodes) if node.gpus > 0]
        self._by_spec: dict[tuple[str, ...], list[int]] = {}
        self.used_milli = 0
        self.frag_state = [
            frag.state_id(self.model[i], self.cpu_left[i], self.sorted_left[i])
            for i in self.all_nodes
        ]
        self.frag_milli = sum(frag.state_amounts[state] for state in self.frag_state)
        self.learnt = _Learnt(models)

    def _fit_key(self, node: int) -> float:
        """BestFit's free-resource key: ½ free CPU / max CPU + ½ free GPU milli / max GPU milli."""
        return self.cpu_left[node] / self.max_cpu * 0.5 + self.total_left[node] / self.max_gpu * 0.5

    def feasible(self, pod: Pod) -> list[int]:
        """The nodes that can take ``pod`` now, in node order."""
        cpu, mem, cpu_left, mem_left = pod.cpu_milli, pod.memory_mib, self.cpu_left, self.mem_left
        if pod.num_gpu == 0:
            return [i for i in self.all_nodes if cpu_left[i] >= cpu and mem_left[i] >= mem]
        base = self.gpu_nodes
        if pod.gpu_spec:
            spec = pod.gpu_spec
            found = self._by_spec.get(spec)
            if found is None:
                found = [i for i in base if self.model_name[i] in spec]
                self._by_spec[spec] = found
            base = found
        if pod.gpu_milli >= MILLI:
            need, full = pod.num_gpu, self.full_free
            return [
                i for i in base if full[i] >= need and cpu_left[i] >= cpu and mem_left[i] >= mem
            ]
        milli, most = pod.gpu_milli, self.max_left
        return [i for i in base if most[i] >= milli and cpu_left[i] >= cpu and mem_left[i] >= mem]

    def tightest_gpu(self, node: int, milli: int) -> int:
        """The first GPU of ``node`` with the least free milli that still fits ``milli``."""
        gpus = self.gpus[node]
        value = self.sorted_left[node][bisect_left(self.sorted_left[node], milli)]
        return gpus.index(value)

    def place(self, node: int, pod: Pod, gpu: int | None) -> tuple[int, ...]:
        """Bind ``pod`` to ``node`` (a fraction on GPU ``gpu``; whole GPUs: the first free ones).

        Returns the GPUs taken.
        """
        self.cpu_left[node] -= pod.cpu_milli
        self.mem_left[node] -= pod.memory_mib
        taken: tuple[int, ...] = ()
        if pod.num_gpu:
            gpus = self.gpus[node]
            if pod.gpu_milli < MILLI:
                assert gpu is not None
                gpus[gpu] -= pod.gpu_milli
                taken = (gpu,)
            else:
                for index, value in enumerate(gpus):
                    if len(taken) == pod.num_gpu:
                        break
                    if value == MILLI:
                        gpus[index] = 0
                        taken += (index,)
            left = tuple(sorted(gpus))
            self.sorted_left[node] = left
            self.total_left[node] = sum(left)
            self.full_free[node] = len(left) - bisect_left(left, MILLI)
            self.max_left[node] = left[-1]
            self.used_milli += pod.total_milli
        self.fit_key[node] = self._fit_key(node)
        frag = self.frag
        old = self.frag_state[node]
        new = frag.state_id(self.model[node], self.cpu_left[node], self.sorted_left[node])
        self.frag_state[node] = new
        self.frag_milli += frag.state_amounts[new] - frag.state_amounts[old]
        return taken


def node_ranks(nodes: Sequence[Node], rng: random.Random) -> list[int]:
    """Each node's place in a random order: the simulator's tie-break among equal scores.

    The simulator prefixes node names (sorted) with a random permutation and its scheduler breaks
    score ties by the smallest name, so every tie of a run goes to the same, random, node order.
    """
    by_name = sorted(range(len(nodes)), key=lambda i: nodes[i].name)
    permutation = list(range(len(nodes)))
    rng.shuffle(permutation)
    rank = [0] * len(nodes)
    for position, index in enumerate(by_name):
        rank[index] = permutation[position]
    return rank


Choice = tuple[int, int | None]
PolicyFn = Callable[[_Cluster, Pod, list[int], random.Random], Choice]


def _random(cluster: _Cluster, pod: Pod, feasible: list[int], rng: random.Random) -> Choice:
    node = rng.choice(feasible)
    if pod.num_gpu == 1 and pod.gpu_milli < MILLI:
        milli = pod.gpu_milli
        fitting = [index for index, value in enumerate(cluster.gpus[node]) if value >= milli]
        return node, rng.choice(fitting)
    return node, None


def _bestfit(cluster: _Cluster, pod: Pod, feasible: list[int], rng: random.Random) -> Choice:
    # The score is int(100 · (1 − v)) with v = ½(cpu_left − cpu)/max_cpu + ½(gpu_left − gpu)/
    # max_gpu: only nodes within 0.01 of the smallest free-resource key can share the top score,
    # so the exact scores are computed for those alone.
    key = cluster.fit_key
    lowest = key[min(feasible, key=key.__getitem__)]
    limit = lowest + 0.01 + 1e-9
    near = [i for i in feasible if key[i] <= limit]
    cpu, gpu = pod.cpu_milli, pod.total_milli
    max_cpu, max_gpu = float(cluster.max_cpu), float(cluster.max_gpu)
    cpu_left, gpu_left, rank = cluster.cpu_left, cluster.total_left, cluster.rank
    node, best, best_rank = -1, -1, 0
    for i in near:
        score = int(
            (1.0 - ((cpu_left[i] - cpu) / max_cpu * 0.5 + (gpu_left[i] - gpu) / max_gpu * 0.5))
            * 100
        )
        if score > best or (score == best and rank[i] < best_rank):
            node, best, best_rank = i, score, rank[i]
    if pod.num_gpu == 1 and pod.gpu_milli < MILLI:
        return node, cluster.tightest_gpu(node, pod.gpu_milli)
    return node, None


def _fgd(cluster: _Cluster, pod: Pod, feasible: list[int], rng: random.Random) -> Choice:
    frag = cluster.frag
    thresholds, cpu = frag.thresholds, pod.cpu_milli
    states, cpu_left, rank = cluster.frag_state, cluster.cpu_left, cluster.rank
    cache = frag.scores.setdefault((pod.gpu_milli, pod.num_gpu), {})
    lookup = cache.get
    node, best, best_rank = -1, -1, 0
    pick: tuple[int, tuple[int, ...]] = (0, ())
    for i in feasible:
        key = (states[i], bisect_right(thresholds, cpu_left[i] - cpu))
        found = lookup(key)
        if found is None:
            found = frag.fgd_score(key[0], key[1], pod.gpu_milli, pod.num_gpu)
            cache[key] = found
        score = found[0]
        if score > best or (score == best and rank[i] < best_rank):
            node, best, best_rank, pick = i, score, rank[i], found
    if pod.num_gpu == 1 and pod.gpu_milli < MILLI:
        gpus = cluster.gpus[node]
        return node, min(gpus.index(value) for value in pick[1])
    return node, None


class _Learnt:
    """What ``ours`` knows of the workload: the request mix seen so far, and memoised costs.

    Every arrival is counted in a :class:`~gpu_request_router.core.fragmentation.RequestMix`
    (shape: CPU, GPU milli, GPU count, models) before it is placed; the typical requests are
    refreshed at 16, 32, 64, … arrivals and every :data:`REFRESH_EVERY` after 512, and the memo
    of node states is dropped with them.
    """

    def __init__(self, models: Sequence[str]) -> None:
        self.mix: RequestMix[tuple[int, int, int, str]] = RequestMix()
        self.models = list(models)
        self.next_refresh = 16
        self.thresholds: list[int] = []
        self.rows: list[tuple[int, int, float, int, frozenset[str] | None]] = []
        self.costs: dict[tuple[int, int, int, tuple[int, ...], int, int], tuple[float, int]] = {}
        self._amounts: dict[tuple[int, int, tuple[int, ...]], float] = {}

    def observe(self, pod: Pod) -> None:
        """Count ``pod`` in the mix; refresh the typical requests when it is time."""
        self.mix.observe((pod.cpu_milli, pod.gpu_milli, pod.num_gpu, "|".join(pod.gpu_spec)))
        if self.mix.total >= self.next_refresh:
            self.next_refresh = min(2 * self.next_refresh, self.next_refresh + REFRESH_EVERY)
            typical = self.mix.typical()
            self.thresholds = sorted({cpu for (cpu, milli, _, _), _ in typical if milli > 0})
            self.rows = [
                (
                    milli,
                    num,
                    weight,
                    self.thresholds.index(cpu) if milli > 0 else -1,
                    frozenset(spec.split("|")) if spec else None,
                )
                for (cpu, milli, num, spec), weight in typical
            ]
            self.costs.clear()
            self._amounts.clear()

    def rank(self, cpu_left: int) -> int:
        """How many typical CPU requests ``cpu_left`` meets."""
        return bisect_right(self.thresholds, cpu_left)

    def amount(self, model: int, rank: int, left: tuple[int, ...]) -> float:
        """The node's fragmentation (:func:`fragmentation`) under the learnt mix, memoised."""
        key = (model, rank, left)
        found = self._amounts.get(key)
        if found is None:
            name = self.models[model]
            mix = [
                Demand(milli, num, weight, (spec is None or name in spec) and cpu_index < rank)
                for milli, num, weight, cpu_index, spec in self.rows
            ]
            found = fragmentation(left, mix)
            self._amounts[key] = found
        return found

    def cost(self, model: int, left: tuple[int, ...], cpu_left: int, pod: Pod) -> tuple[float, int]:
        """The least growth of fragmentation ``pod`` can cause on a node, and the GPU it takes.

        The GPU is given by its free milli before (a fraction: the tightest GPU of that least
        cost; whole GPUs and CPU-only pods: 0).
        """
        before, after = self.rank(cpu_left), self.rank(cpu_left - pod.cpu_milli)
        key = (pod.gpu_milli, pod.num_gpu, model, left, before, after)
        found = self.costs.get(key)
        if found is not None:
            return found
        base = self.amount(model, before, left)
        if pod.num_gpu == 0:
            found = (round(self.amount(model, after, left) - base, 6), 0)
        elif pod.gpu_milli >= MILLI:
            taken = (0,) * pod.num_gpu + left[: len(left) - pod.num_gpu]
            found = (round(self.amount(model, after, taken) - base, 6), 0)
        else:
            found = (math.inf, 0)
            for index in range(bisect_left(left, pod.gpu_milli), len(left)):
                value = left[index]
                if index > 0 and left[index - 1] == value:
                    continue
                changed = sorted((*left[:index], value - pod.gpu_milli, *left[index + 1 :]))
                grown = round(self.amount(model, after, tuple(changed)) - base, 6)
                if grown < found[0]:
                    found = (grown, value)
        self.costs[key] = found
        return found


def _ours(cluster: _Cluster, pod: Pod, feasible: list[int], rng: random.Random) -> Choice:
    learnt = cluster.learnt
    model, left, cpu_left, rank = cluster.model, cluster.sorted_left, cluster.cpu_left, cluster.rank
    fraction = pod.num_gpu == 1 and pod.gpu_milli < MILLI
    # fragmentation bucket, then the tightest fit (a fraction: the GPU with the least milli that
    # fits; else the node with the least free GPU milli), then the run's node order
    tight = cluster.total_left
    best: tuple[int, int, int] | None = None
    node, value = -1, 0
    for i in feasible:
        grown, taken = learnt.cost(model[i], left[i], cpu_left[i], pod)
        key = (cost_bucket(grown, MILLI), taken if fraction else tight[i], rank[i])
        if best is None or key < best:
            best, node, value = key, i, taken
    if fraction:
        return node, cluster.gpus[node].index(value)
    return node, None


_POLICIES: Mapping[str, PolicyFn] = {
    "random": _random,
    "bestfit": _bestfit,
    "fgd": _fgd,
    "ours": _ours,
}


# ---------------------------------------------------------------------------------------------
# Runs and their metrics


@dataclass(frozen=True, slots=True)
class SeedRun:
    """One policy on one seed: the curves (index: arrived load in %) and counts."""

    policy: str
    seed: int
    allocation: list[float | None]
    fragmentation: list[float | None]
    arrivals: int
    scheduled: int
    arrived_milli: int
    seconds: float
    cpu_seconds: float

    @property
    def allocation_at_100(self) -> float | None:
        """GPU allocation (%) at 100 % arrived load."""
        return _at(self.allocation, 100)

    @property
    def fragmentation_at_100(self) -> float | None:
        """Fragmentation (% of capacity) at 100 % arrived load."""
        return _at(self.fragmentation, 100)


def _at(curve: Sequence[float | None], load: int) -> float | None:
    return curve[load] if load < len(curve) else None


def discretize(
    arrived: Sequence[int],
    values: Sequence[float],
    capacity_gpus: int,
    max_load: int,
    *,
    round_each: bool = True,
) -> list[float | None]:
    """The mean of ``values`` per whole percent of arrived load, as the artifact's merge scripts.

    Each sample's load is ``round(arrived / capacity)`` in % (half to even); the value at ``x`` is
    the mean over the samples at ``x``, or at ``x-1..x+1`` when there are none (``None`` when that
    is empty too). Values are GPU milli, shown as % of the capacity; ``round_each`` rounds each
    sample to 2 decimals first (the allocation curve does, the fragmentation one does not).
    """
    by_load: dict[int, list[float]] = {}
    for milli, value in zip(arrived, values, strict=True):
        load = round(milli / capacity_gpus / 10)
        ratio = value / capacity_gpus / 10
        by_load.setdefault(load, []).append(round(ratio, 2) if round_each else ratio)
    curve: list[float | None] = []
    for load in range(max_load + 1):
        samples = by_load.get(load)
        if not samples:
            samples = [v for near in (load - 1, load, load + 1) for v in by_load.get(near, ())]
        curve.append(round(statistics.fmean(samples), 2) if samples else None)
    return curve


@dataclass(frozen=True, slots=True)
class Packing:
    """What happened to each arrival: where it went, and the cluster after it."""

    nodes: list[str] = field(default_factory=list)
    """The node each arrival went to (``""``: it fit nowhere)."""
    gpus: list[tuple[int, ...]] = field(default_factory=list)
    """The GPUs (indices on the node) each arrival took."""
    arrived_milli: list[int] = field(default_factory=list)
    """GPU demand arrived so far, this arrival included."""
    used_milli: list[int] = field(default_factory=list)
    """GPU milli allocated in the cluster after this arrival."""
    frag_milli: list[float] = field(default_factory=list)
    """FGD's fragmentation amount of the cluster (GPU milli) after this arrival."""

    @property
    def scheduled(self) -> int:
        """How many arrivals found a node."""
        return sum(1 for node in self.nodes if node)


def pack(
    nodes: Sequence[Node],
    arrivals: Sequence[Pod],
    policy: str,
    rng: random.Random,
    workload: Sequence[Pod] | None = None,
) -> Packing:
    """Place ``arrivals`` one by one with ``policy``; nothing departs, misfits are skipped.

    ``workload`` (default: the arrivals) gives FGD's typical pods. ``rng`` first draws the node
    order that breaks score ties, then serves the policy's random choices.
    """
    try:
        choose = _POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICY_NAMES}") from None
    rank = node_ranks(nodes, rng)
    models = sorted({node.model for node in nodes})
    typical = typical_pods(workload if workload is not None else arrivals)
    cluster = _Cluster(nodes, _FragModel(typical, models), rank)
    out = Packing()
    arrived = 0
    for pod in arrivals:
        arrived += pod.total_milli
        cluster.learnt.observe(pod)
        feasible = cluster.feasible(pod)
        if feasible:
            node, gpu = choose(cluster, pod, feasible, rng)
            out.gpus.append(cluster.place(node, pod, gpu))
            out.nodes.append(nodes[node].name)
        else:
            out.gpus.append(())
            out.nodes.append("")
        out.arrived_milli.append(arrived)
        out.used_milli.append(cluster.used_milli)
        out.frag_milli.append(cluster.frag_milli)
    return out


def simulate(
    nodes: Sequence[Node],
    pods: Sequence[Pod],
    policy: str,
    seed: int,
    max_load: int = 130,
    order: str = "shuffle",
) -> SeedRun:
    """One run of the protocol: ``random.Random(seed)`` draws the arrivals, then :func:`pack`."""
    started, cpu_started = time.perf_counter(), time.process_time()
    capacity_gpus = sum(node.gpus for node in nodes)
    if capacity_gpus == 0:
        raise ValueError("the cluster has no GPUs")
    rng = random.Random(seed)
    arrivals = arrival_sequence(pods, capacity_gpus * MILLI, rng, max_load, order)
    packing = pack(nodes, arrivals, policy, rng, workload=pods)
    arrived = packing.arrived_milli
    return SeedRun(
        policy=policy,
        seed=seed,
        allocation=discretize(arrived, packing.used_milli, capacity_gpus, max_load),
        fragmentation=discretize(
            arrived, packing.frag_milli, capacity_gpus, max_load, round_each=False
        ),
        arrivals=len(arrivals),
        scheduled=packing.scheduled,
        arrived_milli=arrived[-1] if arrived else 0,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
    )


# ---------------------------------------------------------------------------------------------
# The paper's published curves


@dataclass(frozen=True, slots=True)
class ReferenceCurves:
    """One policy's published curves, one per seed (index: arrived load in %)."""

    policy: str
    allocation: list[list[float | None]]
    fragmentation: list[list[float | None]]

    def mean(self, kind: str = "allocation") -> list[float | None]:
        """The mean curve over seeds (``kind``: ``allocation`` or ``fragmentation``)."""
        curves = self.allocation if kind == "allocation" else self.fragmentation
        return _mean_curve(curves)

    def at_100(self, kind: str = "allocation") -> float | None:
        """The mean over seeds at 100 % arrived load."""
        return _at(self.mean(kind), 100)


def _mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float | None]:
    length = max((len(curve) for curve in curves), default=0)
    out: list[float | None] = []
    for load in range(length):
        values = [v for c in curves if load < len(c) and (v := c[load]) is not None]
        out.append(round(statistics.fmean(values), 2) if values else None)
    return out


def _read_reference_file(path: Path, workload: str) -> dict[str, list[list[float | None]]]:
    out: dict[str, list[list[float | None]]] = {}
    if not path.is_file():
        return out
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("workload") != workload:
                continue
            policy = row["sc_policy"].split("-", 1)[-1]
            loads = sorted(int(key) for key in row if key.isdigit())
            curve: list[float | None] = [None] * (loads[-1] + 1 if loads else 0)
            for load in loads:
                text = row[str(load)]
                curve[load] = float(text) if text else None
            out.setdefault(policy, []).append(curve)
    return out


def load_reference(
    directory: Path, workload: str = "openb_pod_list_default"
) -> dict[str, ReferenceCurves]:
    """The paper's curves for ``workload`` from ``analysis_{allo,frag}_discrete.csv``."""
    allocation = _read_reference_file(directory / "analysis_allo_discrete.csv", workload)
    fragmentation = _read_reference_file(directory / "analysis_frag_discrete.csv", workload)
    return {
        policy: ReferenceCurves(policy, curves, fragmentation.get(policy, []))
        for policy, curves in allocation.items()
    }


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True, slots=True)
class PackingReport:
    """All runs, grouped by policy, and what the cluster and the protocol were."""

    nodes: int
    gpus: int
    pods: int
    seeds: list[int]
    max_load: int
    order: str
    runs: dict[str, list[SeedRun]]
    reference: dict[str, ReferenceCurves]
    seconds: float
    workload: str = ""
    """The workload's name (the pod file's, e.g. ``openb_pod_list_default``)."""

    def paper_fgd(self) -> float | None:
        """The paper's FGD at 100 %: the workload's reference curves, else the published figure.

        The published figure is ``openb_pod_list_default``'s.
        """
        if "FGD" in self.reference:
            return self.reference["FGD"].at_100("allocation")
        return PAPER_ALLOCATION_AT_100["FGD"]

    def _mean_at_100(self, policy: str) -> float | None:
        values = [
            value
            for run in self.runs.get(policy, ())
            if (value := run.allocation_at_100) is not None
        ]
        return round(statistics.fmean(values), 2) if values else None

    def summary(self, policy: str) -> dict[str, Any]:
        """Means and standard deviations at 100 % arrived load, and the paper's value."""
        runs = self.runs[policy]
        alloc = [r.allocation_at_100 for r in runs if r.allocation_at_100 is not None]
        frag = [r.fragmentation_at_100 for r in runs if r.fragmentation_at_100 is not None]
        paper = PAPER_NAMES.get(policy)
        paper_alloc = PAPER_ALLOCATION_AT_100.get(paper) if paper else None
        paper_frag = None
        if paper and paper in self.reference:
            paper_alloc = self.reference[paper].at_100("allocation")
            paper_frag = self.reference[paper].at_100("fragmentation")
        mean_alloc = round(statistics.fmean(alloc), 2) if alloc else None
        paper_fgd = self.paper_fgd()
        measured_fgd = self._mean_at_100("fgd") if policy != "fgd" else None
        return {
            "policy": policy,
            "description": POLICY_DESCRIPTIONS[policy],
            "paper_policy": paper,
            "allocation_pct": mean_alloc,
            "allocation_sd": round(statistics.stdev(alloc), 2) if len(alloc) > 1 else 0.0,
            "fragmentation_pct": round(statistics.fmean(frag), 2) if frag else None,
            "fragmentation_sd": round(statistics.stdev(frag), 2) if len(frag) > 1 else 0.0,
            "paper_allocation_pct": paper_alloc,
            "paper_fragmentation_pct": paper_frag,
            "difference_pct": (
                round(mean_alloc - paper_alloc, 2)
                if mean_alloc is not None and paper_alloc is not None
                else None
            ),
            "vs_fgd_pct": (
                round(mean_alloc - paper_fgd, 2)
                if mean_alloc is not None and paper_fgd is not None
                else None
            ),
            "vs_fgd_measured_pct": (
                round(mean_alloc - measured_fgd, 2)
                if mean_alloc is not None and measured_fgd is not None
                else None
            ),
        }

    def to_json(self) -> dict[str, Any]:
        """Every metric per policy and seed, and the means at 100 % arrived load."""
        return {
            "benchmark": "packing",
            "protocol": {
                "workload": self.workload,
                "nodes": self.nodes,
                "gpus": self.gpus,
                "pods": self.pods,
                "seeds": self.seeds,
                "max_load_pct": self.max_load,
                "order": self.order,
                "x": "arrived GPU demand, % of cluster GPU capacity (index of each curve)",
            },
            "policies": {
                policy: {
                    "at_100": self.summary(policy),
                    "runs": [
                        {
                            "seed": run.seed,
                            "allocation_at_100": run.allocation_at_100,
                            "fragmentation_at_100": run.fragmentation_at_100,
                            "arrivals": run.arrivals,
                            "scheduled": run.scheduled,
                            "failed": run.arrivals - run.scheduled,
                            "arrived_gpu_milli": run.arrived_milli,
                            "seconds": round(run.seconds, 3),
                            "cpu_seconds": round(run.cpu_seconds, 3),
                            "allocation_pct": run.allocation,
                            "fragmentation_pct": run.fragmentation,
                        }
                        for run in runs
                    ],
                }
                for policy, runs in self.runs.items()
            },
            "reference": {
                policy: {
                    "seeds": len(curves.allocation),
                    "allocation_at_100": curves.at_100("allocation"),
                    "fragmentation_at_100": curves.at_100("fragmentation"),
                }
                for policy, curves in self.reference.items()
            },
            "paper_allocation_at_100": dict(PAPER_ALLOCATION_AT_100),
            "seconds": round(self.seconds, 2),
        }


def _run_task(task: tuple[Sequence[Node], Sequence[Pod], str, int, int, str]) -> SeedRun:
    return simulate(*task)


def run_benchmark(
    nodes: Sequence[Node],
    pods: Sequence[Pod],
    policies: Sequence[str] = POLICY_NAMES,
    seeds: int = 10,
    max_load: int = 130,
    order: str = "shuffle",
    reference: Mapping[str, ReferenceCurves] | None = None,
    jobs: int = 1,
    workload: str = "",
) -> PackingReport:
    """Run every policy on seeds 42, 43, … (``jobs`` processes) and collect the report."""
    unknown = [policy for policy in policies if policy not in _POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; choose from {POLICY_NAMES}")
    seed_list = [FIRST_SEED + k for k in range(seeds)]
    tasks = [(nodes, pods, p, s, max_load, order) for p in policies for s in seed_list]
    started = time.perf_counter()
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
            results = list(pool.map(_run_task, tasks))
    else:
        results = [_run_task(task) for task in tasks]
    runs: dict[str, list[SeedRun]] = {policy: [] for policy in policies}
    for run in results:
        runs[run.policy].append(run)
    return PackingReport(
        nodes=len(nodes),
        gpus=sum(node.gpus for node in nodes),
        pods=len(pods),
        seeds=seed_list,
        max_load=max_load,
        order=order,
        runs=runs,
        reference=dict(reference or {}),
        seconds=time.perf_counter() - started,
        workload=workload,
    )


def _plot_curve(
    axes: Any, curve: Sequence[float | None], style: str, start: int = 0, **kwargs: Any
) -> None:
    points = [(x, y) for x, y in enumerate(curve) if y is not None and x >= start]
    if points:
        axes.plot([x for x, _ in points], [y for _, y in points], style, **kwargs)


def write_plot(report: PackingReport, path: Path) -> None:
    """Allocation and fragmentation vs arrived load: ours solid, the paper's dashed (a PNG)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5), layout="constrained")
    alloc_axes, frag_axes = figure.subplots(1, 2)
    zoom = alloc_axes.inset_axes((0.42, 0.08, 0.55, 0.5))
    last = report.max_load
    curves: list[tuple[Any, str, str, dict[str, Any]]] = []
    for paper, reference in report.reference.items():
        style: dict[str, Any] = {"color": _PAPER_COLOURS.get(paper, "black"), "linewidth": 1}
        label = f"paper {paper}"
        curves.append((reference.mean("allocation")[: last + 1], "--", label, style))
        curves.append((reference.mean("fragmentation")[: last + 1], "--", label, style))
    for policy, runs in report.runs.items():
        style = {"color": _COLOURS.get(policy, "black"), "linewidth": 1.8}
        label = f"{policy} (this run)"
        curves.append((_mean_curve([run.allocation for run in runs]), "-", label, style))
        curves.append((_mean_curve([run.fragmentation for run in runs]), "-", label, style))
    for index, (curve, line, label, style) in enumerate(curves):
        if index % 2 == 0:
            _plot_curve(alloc_axes, curve, line, label=label, **style)
            _plot_curve(zoom, curve, line, start=80, **style)
        else:
            _plot_curve(frag_axes, curve, line, label=label, **style)
    zoom.set_title("80 % and above", fontsize=8)
    zoom.tick_params(labelsize=7)
    zoom.grid(True, alpha=0.3)
    alloc_axes.set_title("GPU allocation")
    alloc_axes.set_ylabel("allocated GPU milli, % of capacity")
    frag_axes.set_title("GPU fragmentation (FGD's measure)")
    frag_axes.set_ylabel("fragmented idle GPU milli, % of capacity")
    for axes in (alloc_axes, frag_axes):
        axes.set_xlabel("arrived GPU demand, % of capacity")
        axes.grid(True, alpha=0.3)
    alloc_axes.legend(fontsize=7, loc="upper left")
    frag_axes.legend(fontsize=7, loc="lower left")
    figure.suptitle(
        f"Packing, FGD protocol, {report.workload or 'workload'}: {report.nodes} nodes, "
        f"{report.gpus} GPUs, "
        f"{len(report.seeds)} seeds, arrivals in {report.order} order"
    )
    figure.savefig(path, dpi=110)


def _print_table(report: PackingReport, console: Console) -> None:
    table = Table(title="Packing (FGD protocol): at 100 % arrived GPU demand")
    table.add_column("policy")
    table.add_column("GPU allocation %", justify="right")
    table.add_column("fragmentation %", justify="right")
    table.add_column("paper", justify="right")
    table.add_column("difference", justify="right")
    for policy in report.runs:
        row = report.summary(policy)
        paper = row["paper_policy"]
        paper_value = row["paper_allocation_pct"]
        table.add_row(
            policy,
            _pm(row["allocation_pct"], row["allocation_sd"]),
            _pm(row["fragmentation_pct"], row["fragmentation_sd"]),
            f"{paper} {paper_value:.2f}" if paper and paper_value is not None else "—",
            f"{row['difference_pct']:+.2f}" if row["difference_pct"] is not None else "—",
        )
    console.print(table)
    if "ours" in report.runs:
        ours = report.summary("ours")
        if ours["vs_fgd_pct"] is not None:
            measured = ours["vs_fgd_measured_pct"]
            console.print(
                f"ours: {ours['allocation_pct']:.2f} % allocated at 100 % arrived load, "
                f"{ours['vs_fgd_pct']:+.2f} points against the paper's FGD "
                f"({report.paper_fgd():.2f} %)"
                + ("" if measured is None else f", {measured:+.2f} against fgd measured here")
            )
    runs = [run for runs in report.runs.values() for run in runs]
    console.print(
        f"{len(runs)} runs, {sum(run.arrivals for run in runs)} arrivals in "
        f"{report.seconds:.1f} s ({sum(run.cpu_seconds for run in runs):.1f} CPU-seconds of "
        "simulation)"
    )


def _pm(mean: float | None, sd: float) -> str:
    return "—" if mean is None else f"{mean:.2f} ± {sd:.2f}"


def command(
    nodes: Annotated[
        Path, typer.Option("--nodes", help="Node CSV: sn,cpu_milli,memory_mib,gpu,model.")
    ],
    pods: Annotated[
        Path,
        typer.Option("--pods", help="Pod CSV: name,cpu_milli,memory_mib,num_gpu,gpu_milli,…"),
    ],
    seeds: Annotated[int, typer.Option(help="Seeds per policy (42, 43, …).", min=1)] = 10,
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help=f"Policy to run, repeatable: {', '.join(POLICY_NAMES)}."),
    ] = None,
    max_load: Annotated[
        int, typer.Option("--max-load", help="Arrived GPU demand to stop at, % of capacity.", min=1)
    ] = 130,
    order: Annotated[
        str,
        typer.Option(help="Trace order before sampling: shuffle (the paper's runs) or creation."),
    ] = "shuffle",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every metric to this JSON file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the curves to this PNG file.")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="The paper's results (e.g. benchmarks/fgd_reference_results) to compare with.",
        ),
    ] = None,
    jobs: Annotated[
        int | None, typer.Option(help="Processes to run on (default: all CPUs).", min=1)
    ] = None,
) -> None:
    """Packing on the Alibaba GPU trace, the FGD paper's way: allocation and fragmentation."""
    console = Console()
    provenance = capture()
    try:
        node_list = load_nodes(nodes)
        pod_list = load_pods(pods)
        policies = list(policy or POLICY_NAMES)
        unknown = [name for name in policies if name not in _POLICIES]
        if unknown:
            raise ValueError(f"unknown policy {', '.join(unknown)}; choose from {POLICY_NAMES}")
        curves: dict[str, ReferenceCurves] = {}
        if reference is not None:
            curves = load_reference(reference, pods.stem)
            if not curves:
                console.print(f"no reference curves for workload {pods.stem!r} in {reference}")
        else:
            console.print(
                "hint: --reference benchmarks/fgd_reference_results compares with, and plots, "
                "the paper's curves"
            )
        report = run_benchmark(
            node_list,
            pod_list,
            policies,
            seeds=seeds,
            max_load=max_load,
            order=order,
            reference=curves,
            jobs=jobs or os.cpu_count() or 1,
            workload=pods.stem,
        )
    except (OSError, ValueError) as exc:
        console.print(f"[red]packing:[/red] {exc}")
        raise typer.Exit(2) from exc
    _print_table(report, console)
    if json_path is not None:
        write_json(json_path, report.to_json(), provenance)
        console.print(f"JSON: {json_path}")
    if plot is not None:
        write_plot(report, plot)
        console.print(f"plot: {plot}")

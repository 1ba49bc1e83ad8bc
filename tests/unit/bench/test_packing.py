import json
import random
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_request_router.bench import packing
from gpu_request_router.bench.cli import bench_app
from gpu_request_router.bench.packing import Node, Pod
from gpu_request_router.bench.provenance import problems

REFERENCE = Path(__file__).resolve().parents[3] / "benchmarks" / "fgd_reference_results"
NODE_COLUMNS = "sn,cpu_milli,memory_mib,gpu,model"
POD_COLUMNS = (
    "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
    "creation_time,deletion_time,scheduled_time"
)


def _node(
    name: str, gpus: int = 2, cpu: int = 32_000, memory: int = 65_536, model: str = "T4"
) -> Node:
    return Node(name, cpu, memory, gpus, model)


def _pod(
    name: str,
    milli: int = 1000,
    count: int = 1,
    cpu: int = 1000,
    memory: int = 1024,
    spec: tuple[str, ...] = (),
    created: float = 0.0,
) -> Pod:
    return Pod(name, cpu, memory, count if milli else 0, milli if count else 0, spec, created)


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _pod_row(
    name: str, cpu: int, num_gpu: int, milli: int, spec: str = "", created: int = 0
) -> str:
    return (
        f"{name},{cpu},1024,{num_gpu},{milli},{spec},LS,Running,{created},{created + 100},{created}"
    )


# --- the trace --------------------------------------------------------------------------------


def test_load_pods_reads_fractions_whole_gpus_cpu_only_pods_and_gpu_specs(tmp_path: Path) -> None:
    """A fraction, a 2-GPU pod, a CPU-only pod and a model list are read as the simulator does."""
    path = _write_csv(
        tmp_path / "pods.csv",
        POD_COLUMNS,
        [
            _pod_row("p-frac", 6000, 1, 460),
            _pod_row("p-two", 12000, 2, 1000, "V100M16|V100M32"),
            _pod_row("p-cpu", 8000, 0, 0),
            _pod_row("p-over", 1000, 1, 1500),
        ],
    )
    pods = packing.load_pods(path)
    assert [(p.num_gpu, p.gpu_milli, p.total_milli) for p in pods] == [
        (1, 460, 460),
        (2, 1000, 2000),
        (0, 0, 0),
        (1, 1000, 1000),
    ]
    assert pods[1].gpu_spec == ("V100M16", "V100M32")
    assert pods[0].gpu_spec == ()


def test_loaders_reject_a_file_without_the_required_columns(tmp_path: Path) -> None:
    """A CSV that lacks a required column is refused with the column's name."""
    path = _write_csv(tmp_path / "nodes.csv", "sn,cpu_milli,gpu", ["n1,1000,1"])
    with pytest.raises(ValueError, match="memory_mib"):
        packing.load_nodes(path)


# --- the arrival protocol ---------------------------------------------------------------------


def test_arrivals_are_the_shuffled_trace_then_samples_until_the_target_load() -> None:
    """The trace comes first, shuffled; samples with replacement follow and stop at 130 %."""
    pods = [_pod("a", 1000), _pod("b", 500), _pod("c", 0, cpu=4000), _pod("d", 250)]
    capacity = 4 * 1000
    sequence = packing.arrival_sequence(pods, capacity, random.Random(7), 130)
    assert sorted(p.name for p in sequence[:4]) == ["a", "b", "c", "d"]
    total = sum(p.total_milli for p in sequence)
    assert total <= 1.3 * capacity
    assert total > 1.3 * capacity - 1000  # the next draw would have passed the target
    extra = Counter(p.name for p in sequence[4:])
    assert sum(extra.values()) >= 3
    assert max(Counter(p.name for p in sequence).values()) >= 2  # drawn with replacement


def test_arrivals_are_deterministic_per_seed() -> None:
    """The same seed gives the same arrivals; another seed gives another order."""
    pods = [_pod(f"p{i}", 100 * (i % 9 + 1)) for i in range(30)]
    first = packing.arrival_sequence(pods, 10_000, random.Random(42))
    again = packing.arrival_sequence(pods, 10_000, random.Random(42))
    other = packing.arrival_sequence(pods, 10_000, random.Random(43))
    assert [p.name for p in first] == [p.name for p in again]
    assert [p.name for p in first] != [p.name for p in other]


def test_creation_order_keeps_the_trace_order_and_a_low_target_drops_pods() -> None:
    """``creation`` keeps creation time order; a target below the trace's demand removes pods."""
    pods = [
        _pod("late", 1000, created=50),
        _pod("early", 1000, created=10),
        _pod("mid", 1000, created=20),
    ]
    sequence = packing.arrival_sequence(pods, 10_000, random.Random(1), 130, order="creation")
    assert [p.name for p in sequence[:3]] == ["early", "mid", "late"]
    dropped = packing.arrival_sequence(pods, 1000, random.Random(1), 150)
    assert sum(p.total_milli for p in dropped) == 1000
    with pytest.raises(ValueError, match="order"):
        packing.arrival_sequence(pods, 1000, random.Random(1), order="sorted")


# --- placement ---------------------------------------------------------------------------------


def test_bestfit_packs_fractional_pods_onto_the_same_gpu() -> None:
    """BestFit puts a second fraction on the node and GPU the first one already uses."""
    nodes = [_node("n1"), _node("n2")]
    arrivals = [_pod("a", 300), _pod("b", 500)]
    for seed in range(5):
        result = packing.pack(nodes, arrivals, "bestfit", random.Random(seed))
        assert result.nodes[0] == result.nodes[1]
        assert result.gpus[0] == result.gpus[1]
        assert result.used_milli == [300, 800]


def test_a_two_gpu_pod_goes_to_a_node_with_two_free_gpus() -> None:
    """With one GPU of ``a`` partly used, a 2-GPU pod can only go to ``b``, on its GPUs 0 and 1."""
    nodes = [_node("a"), _node("b"), _node("c", gpus=1)]
    arrivals = [_pod("frac", 500), _pod("pair", 1000, count=2)]
    first = packing.pack(nodes, arrivals, "ours", random.Random(0))
    assert first.nodes == ["a", "b"]
    assert first.gpus == [(0,), (0, 1)]
    for policy in packing.POLICY_NAMES:
        for seed in range(5):
            result = packing.pack(nodes, [_pod("x", 1000, count=2)], policy, random.Random(seed))
            assert result.nodes[0] in {"a", "b"}


def test_gpu_spec_restricts_the_gpu_model() -> None:
    """A pod that asks for V100s lands on the V100 node; one that asks for an absent model fails."""
    nodes = [_node("t4", model="T4"), _node("v100", model="V100M32")]
    arrivals = [_pod("v", 1000, spec=("V100M16", "V100M32")), _pod("a10", 500, spec=("A10",))]
    for policy in packing.POLICY_NAMES:
        for seed in range(5):
            result = packing.pack(nodes, arrivals, policy, random.Random(seed))
            assert result.nodes == ["v100", ""]


def test_cpu_and_memory_constrain_the_node() -> None:
    """A pod goes only where its CPU and memory fit, and fits nowhere when no node has enough."""
    nodes = [_node("small", gpus=8, cpu=4000), _node("big", gpus=1, cpu=64_000, memory=8192)]
    arrivals = [
        _pod("cpu-heavy", 1000, cpu=8000),
        _pod("too-big", 500, cpu=100_000),
        _pod("memory-heavy", 500, cpu=1000, memory=16_384),
    ]
    for policy in packing.POLICY_NAMES:
        result = packing.pack(nodes, arrivals, policy, random.Random(3))
        assert result.nodes == ["big", "", "small"]
        assert result.scheduled == 2


def test_ours_takes_the_tightest_gpu_anywhere_before_it_has_learnt_a_mix() -> None:
    """Before any request mix is learnt, the tightest fit decides.

    Every placement then costs nothing: a fraction takes the GPU with the least room left over.
    """
    nodes = [_node("a", gpus=1), _node("b", gpus=1)]
    arrivals = [_pod("p600", 600), _pod("p300", 300), _pod("p500", 500), _pod("cpu", 0, cpu=500)]
    result = packing.pack(nodes, arrivals, "ours", random.Random(0))
    assert result.nodes == ["a", "a", "b", "a"]  # the CPU-only pod: the node with least free GPU


def test_ours_keeps_a_gpu_usable_for_the_requests_it_has_seen() -> None:
    """Once 500-milli requests dominate what it saw, a 300 goes to the empty GPU.

    Not to the tightest: on the 600 left it would leave 300 that no typical request can use.
    """
    nodes = [_node("a", gpus=1), _node("b", gpus=1)]
    # seen but placed nowhere (too much memory): they teach the mix and take no room
    taught = [_pod(f"t{k}", 500, memory=1 << 30) for k in range(20)]
    arrivals = [_pod("p400", 400), *taught, _pod("p300", 300)]
    for seed in range(5):
        result = packing.pack(nodes, arrivals, "ours", random.Random(seed))
        first, last = result.nodes[0], result.nodes[-1]
        assert first and last and first != last
        assert result.frag_milli[-1] == result.frag_milli[0]  # 600 and 700 left: both usable


def test_ours_decides_from_the_arrivals_so_far_only() -> None:
    """A router cannot see the future: ours decides from the arrivals so far.

    Cutting the trace short changes none of the placements made before the cut.
    """
    nodes = [_node(f"n{k}", gpus=k % 3 + 1) for k in range(6)]
    rng = random.Random(7)
    arrivals = [
        _pod(f"p{k}", rng.choice([0, 250, 470, 810, 1000]), count=1, cpu=rng.choice([500, 4000]))
        for k in range(60)
    ]
    whole = packing.pack(nodes, arrivals, "ours", random.Random(1))
    for cut in (10, 25, 40):
        prefix = packing.pack(nodes, arrivals[:cut], "ours", random.Random(1))
        assert prefix.nodes == whole.nodes[:cut]
        assert prefix.gpus == whole.gpus[:cut]


def test_fgd_fills_the_partly_used_gpu_and_measures_fragmentation() -> None:
    """With 600-milli typical pods, FGD puts a second 500 on the used GPU, ending its fragment."""
    # After the first 500 the GPU's 500 left cannot hold a typical pod: 500 milli of fragment.
    # The second 500 on the same GPU leaves none (the other GPU is free); on the other GPU it
    # would leave two 500-milli fragments.
    nodes = [_node("n1")]
    arrivals = [_pod("a", 500), _pod("b", 500)]
    result = packing.pack(nodes, arrivals, "fgd", random.Random(0), workload=[_pod("t", 600)])
    assert result.gpus == [(0,), (0,)]
    assert result.frag_milli == [500.0, 0.0]


def test_typical_pods_cover_95_percent_of_the_pods_renormalised() -> None:
    """Shapes are counted, the most frequent kept until 95 % of the pods, shares renormalised."""
    pods = (
        [_pod(f"a{i}", 1000) for i in range(10)]
        + [_pod(f"b{i}", 500) for i in range(6)]
        + [_pod(f"c{i}", 0, cpu=2000) for i in range(3)]
        + [_pod("d", 250)]
    )
    typical = packing.typical_pods(pods)
    assert [(t.gpu_milli, round(t.share * 19)) for t in typical] == [(1000, 10), (500, 6), (0, 3)]


def test_discretize_averages_per_percent_of_arrived_load() -> None:
    """Each arrival counts at its rounded load; empty points borrow their neighbours."""
    curve = packing.discretize([500, 1000, 1004], [500, 900, 1000], capacity_gpus=1, max_load=100)
    assert curve[50] == 50.0
    assert curve[51] == 50.0
    assert curve[75] is None
    assert curve[100] == 95.0


def test_a_run_reports_allocation_and_fragmentation_at_100_percent() -> None:
    """A full run of the protocol yields both curves up to the maximum load."""
    nodes = [_node(f"n{i}", gpus=4, cpu=64_000) for i in range(8)]
    pods = [_pod(f"p{i}", (i % 5 + 1) * 50, cpu=500) for i in range(20)]  # < 1 % of 32 GPUs each
    run = packing.simulate(nodes, pods, "bestfit", seed=42, max_load=120)
    assert len(run.allocation) == len(run.fragmentation) == 121
    assert run.allocation_at_100 is not None
    assert 0 < run.allocation_at_100 <= 100
    assert run.fragmentation_at_100 is not None
    assert run.scheduled <= run.arrivals


# --- the paper's curves -----------------------------------------------------------------------


def test_the_vendored_reference_gives_the_papers_numbers_at_100_percent() -> None:
    """Random 86.30, BestFit 92.86 and FGD 95.23 % allocated at 100 % arrived, mean of 10 seeds."""
    reference = packing.load_reference(REFERENCE, "openb_pod_list_default")
    assert set(reference) == {"Random", "DotProd", "GpuClustering", "GpuPacking", "BestFit", "FGD"}
    assert len(reference["Random"].allocation) == 10
    assert reference["Random"].at_100() == pytest.approx(86.30, abs=0.005)
    assert reference["BestFit"].at_100() == pytest.approx(92.86, abs=0.005)
    assert reference["FGD"].at_100() == pytest.approx(95.23, abs=0.005)
    assert reference["FGD"].at_100("fragmentation") == pytest.approx(4.73, abs=0.005)


# --- the command --------------------------------------------------------------------------------


def _cluster_files(tmp_path: Path) -> tuple[Path, Path]:
    nodes = _write_csv(
        tmp_path / "nodes.csv",
        NODE_COLUMNS,
        [f"n{i},32000,131072,{(2, 4, 8)[i % 3]},{('T4', 'V100M32')[i % 2]}" for i in range(6)],
    )
    rows = [
        _pod_row(f"p{i:03}", 2000 + 500 * (i % 4), 1, (230, 460, 810, 1000)[i % 4])
        for i in range(24)
    ]
    rows += [_pod_row("cpu", 4000, 0, 0), _pod_row("pair", 8000, 2, 1000, "V100M32")]
    # named like the trace so that the vendored reference curves are overlaid
    pods = _write_csv(tmp_path / "openb_pod_list_default.csv", POD_COLUMNS, rows)
    return nodes, pods


def test_the_command_prints_the_table_and_writes_json_and_a_png(tmp_path: Path) -> None:
    """``gpurouter bench packing`` runs every policy, then writes the JSON and the plot.

    The JSON carries the provenance of the run: its commit, command line, machine and time.
    """
    nodes, pods = _cluster_files(tmp_path)
    out_json, out_png = tmp_path / "packing.json", tmp_path / "packing.png"
    result = CliRunner().invoke(
        bench_app,
        [
            "packing",
            "--nodes", str(nodes),
            "--pods", str(pods),
            "--seeds", "2",
            "--jobs", "1",
            "--json", str(out_json),
            "--plot", str(out_png),
            "--reference", str(REFERENCE),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "92.86" in result.output
    data = json.loads(out_json.read_text())
    assert set(data["policies"]) == set(packing.POLICY_NAMES)
    bestfit = data["policies"]["bestfit"]
    assert [run["seed"] for run in bestfit["runs"]] == [42, 43]
    assert len(bestfit["runs"][0]["allocation_pct"]) == 131
    assert bestfit["at_100"]["paper_allocation_pct"] == pytest.approx(92.86)
    assert data["reference"]["FGD"]["allocation_at_100"] == pytest.approx(95.23)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert problems(data["provenance"]) == []
    assert data["provenance"]["recorded_after"] is False


def test_the_command_runs_one_policy_without_a_reference_and_hints_at_it(tmp_path: Path) -> None:
    """``--policy`` limits the runs; without ``--reference`` the command says how to add it."""
    nodes, pods = _cluster_files(tmp_path)
    out_json = tmp_path / "one.json"
    result = CliRunner().invoke(
        bench_app,
        ["packing", "--nodes", str(nodes), "--pods", str(pods), "--seeds", "1",
         "--policy", "ours", "--max-load", "110", "--jobs", "1", "--json", str(out_json)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--reference" in result.output
    data = json.loads(out_json.read_text())
    assert list(data["policies"]) == ["ours"]
    assert data["reference"] == {}
    assert len(data["policies"]["ours"]["runs"][0]["fragmentation_pct"]) == 111


def test_the_command_refuses_an_unknown_policy(tmp_path: Path) -> None:
    """An unknown policy name exits with status 2 and names the choices."""
    nodes, pods = _cluster_files(tmp_path)
    result = CliRunner().invoke(
        bench_app, ["packing", "--nodes", str(nodes), "--pods", str(pods), "--policy", "nope"]
    )
    assert result.exit_code == 2
    assert "unknown policy" in result.output

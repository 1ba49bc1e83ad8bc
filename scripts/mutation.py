"""Mutation testing of the scheduling core (``make mutation``).

Generates mutmut's mutants of ``src/gpu_request_router/core/`` (configured in ``[tool.mutmut]``
of pyproject.toml), draws a seeded random sample of them, runs ``mutmut run`` on the sample and
prints the score: killed / (sampled - equivalent). mutmut runs, for each mutant, only the core
unit tests that executed the mutated function in its clean run.

    .venv/bin/python scripts/mutation.py --sample 300 --seed 20261206
    .venv/bin/python scripts/mutation.py --sample all
    .venv/bin/python scripts/mutation.py --score-only     # the last run's sample, as recorded

Mutants listed in ``EQUIVALENT`` below (reviewed by hand: no test can tell them from the
original) are taken out of the denominator. Everything is written under ``mutants/``;
``mutants/sample.txt`` holds the drawn names and ``mutants/score.json`` the result.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mutmut.__main__ import create_mutants
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

MUTANTS = Path("mutants")
CORE = Path("src/gpu_request_router/core")

# Mutants no test can kill, with the reason; see "Mutation testing" in docs/development.md.
EQUIVALENT: dict[str, str] = {
    "gpu_request_router.core.request_receiver.xǁRequestReceiverǁestimate__mutmut_12": (
        "the dry run's draft request (shape -> None) feeds only need_of, which reads the "
        "estimate, resources and model, never the shape"
    ),
    "gpu_request_router.core.gpu_state_monitor.xǁGPUStateMonitorǁ_hide__mutmut_1": (
        "`memory_mb > 0` -> `>= 0`: also records a 0 MiB hidden entry, which adds nothing to "
        "hidden_mb and is dropped with the others at the next reading"
    ),
    "gpu_request_router.core.load_balancer.xǁGPUGroupǁ__init____mutmut_5": (
        "`degraded = False` -> `None`: a group is never empty, so the loop's `degraded or ...` "
        "always replaces it with a bool before it is read"
    ),
    "gpu_request_router.core.gpu_state_monitor.xǁGPUStateMonitorǁ__init____mutmut_13": (
        "the sequence starting at 1 instead of 0: it only orders reservations against reading "
        "marks taken from it"
    ),
    "gpu_request_router.core.priority_manager.xǁPriorityManagerǁ_take__mutmut_18": (
        "`_removed += 1` -> `+= 2`: the count only decides when stale heap entries are "
        "compacted, which happens sooner; the order never depends on it"
    ),
    "gpu_request_router.core.priority_manager.xǁPriorityManagerǁ_refresh__mutmut_49": (
        "`len(crossings) > 2 * backlogged + 64` -> `- 64`: the buckets are rebuilt from the "
        "users' own heaps sooner, which changes no order"
    ),
    "gpu_request_router.core.priority_manager.xǁPriorityManagerǁ__init____mutmut_26": (
        "the count of users with work waiting starting at 1: it only sets when stale heap "
        "entries are compacted (two entries later); the order never depends on it"
    ),
    "gpu_request_router.core.request_router.xǁRequestRouterǁ_end_execution__mutmut_5": (
        "`_current.pop(id, None)` -> `pop(id)`: an execution that ends is always its request's "
        "current one (results of other executions are ignored before this point)"
    ),
    "gpu_request_router.core.resource_estimator.x__count__mutmut_14": (
        "`Shape(1, 0, 0)` -> `Shape(1, 0)`: output_tokens defaults to 0"
    ),
    "gpu_request_router.core.state_store.x_encode_cursor__mutmut_6": (
        "`rstrip('=')` -> `rstrip('XX=XX')`: also strips trailing 'X', but the encoded JSON always "
        'ends in `"]`, whose base64 ends in `Q`, `0` or `d`, never in `X`'
    ),
    "gpu_request_router.core.gpu_state_monitor.xǁGPUStateMonitorǁreserve__mutmut_26": (
        "`_seq += 1` -> `+= 2`: the sequence only orders reservations against reading marks; "
        "any increasing step orders them alike"
    ),
    "gpu_request_router.core.load_balancer.x_make_policy__mutmut_1": (
        "the default seed 0 -> 1: every caller that draws (the engine, the benchmarks, the "
        "random-policy tests) passes its seed; the default serves callers that read only the name "
        "or use a policy that draws nothing"
    ),
    "gpu_request_router.core.resource_estimator.x_profile_from_spec__mutmut_53": (
        "`weights_bytes // 2` -> `/ 2`: weights_bytes is a whole number of MiB, so even, and "
        "params only enters float arithmetic (throughput)"
    ),
    "gpu_request_router.core.load_balancer.xǁLoadBalancerǁprospect__mutmut_56": (
        "`score < best` -> `<=`: the score ends with the GPU ids, which differ between the "
        "workers compared, so two scores are never equal"
    ),
    "gpu_request_router.core.request_router.xǁRequestRouterǁ_note_quota_wait__mutmut_11": (
        "`frees < wakeup` -> `<=`: on equality the wakeup is set to the value it already has"
    ),
    "gpu_request_router.core.request_router.xǁRequestRouterǁin_flight__mutmut_3": (
        "`not active or placement is None` -> `and`: differs only for a queued request with a "
        "placement or an active one without; a requeued request's placement is cleared and a "
        "dispatch always sets one, so neither is ever stored"
    ),
}

# mutmut's exit codes per mutant, as its `results` command names them.
_STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not checked",
}


def generate() -> list[str]:
    """Write the mutated copy of the sources under ``mutants/`` and return every mutant's name."""
    MUTANTS.mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(2)
    return sorted(_exit_codes())


def _exit_codes() -> dict[str, int | None]:
    """Each mutant's last recorded mutmut exit code (None: not run yet)."""
    codes: dict[str, int | None] = {}
    for meta in sorted((MUTANTS / CORE).glob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def score(
    sample: list[str], total: int, seed: int | None, run_seconds: float | None
) -> dict[str, Any]:
    """Score ``sample`` from mutmut's records: killed / (checked - equivalent).

    A run stopped early (Ctrl-C) leaves mutants "not checked": they count in neither term and
    the result says ``"complete": false``.
    """
    codes = _exit_codes()
    status = {name: _STATUS.get(codes.get(name), "suspicious") for name in sample}
    counts = Counter(status.values())
    checked = [name for name in sample if status[name] != "not checked"]
    equivalent = [name for name in checked if name in EQUIVALENT]
    killed = counts["killed"] + counts["timeout"]
    denominator = len(checked) - len(equivalent)
    survivors = [
        name
        for name in checked
        if status[name] not in {"killed", "timeout"} and name not in EQUIVALENT
    ]
    return {
        "mutants_total": total,
        "sampled": len(sample),
        "seed": seed,
        "complete": len(checked) == len(sample),
        "checked": len(checked),
        "statuses": dict(sorted(counts.items())),
        "equivalent": len(equivalent),
        "killed_or_timeout": killed,
        "score": round(killed / denominator, 4) if denominator else None,
        "run_seconds": None if run_seconds is None else round(run_seconds),
        "survivors": {name: status[name] for name in survivors},
    }


def main() -> int:
    """Generate, sample, run and score; the exit status is mutmut's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="300", help="how many mutants, or 'all'")
    parser.add_argument("--seed", type=int, default=20261206, help="seed of the random sample")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutmut workers")
    parser.add_argument("--list-only", action="store_true", help="print the sample, run nothing")
    parser.add_argument(
        "--score-only", action="store_true", help="score the last sample; run nothing"
    )
    args = parser.parse_args()

    if args.score_only:
        sample = (MUTANTS / "sample.txt").read_text().split()
        total, run_seconds, returncode = len(_exit_codes()), None, 0
    else:
        names = generate()
        if args.sample == "all":
            sample = names
        else:
            count = min(int(args.sample), len(names))
            sample = sorted(random.Random(args.seed).sample(names, count))
        (MUTANTS / "sample.txt").write_text("".join(f"{name}\n" for name in sample))
        print(f"{len(names)} mutants of {CORE}/; sample of {len(sample)} (seed {args.seed})")
        if args.list_only:
            print("\n".join(sample))
            return 0
        started = time.monotonic()
        mutmut = Path(sys.executable).with_name("mutmut")
        run = subprocess.run([mutmut, "run", f"--max-children={args.max_children}", *sample])
        total, run_seconds, returncode = len(names), time.monotonic() - started, run.returncode

    result = score(sample, total, None if args.score_only else args.seed, run_seconds)
    (MUTANTS / "score.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "survivors"}, indent=2))
    print(f"survivors ({len(result['survivors'])}): `.venv/bin/mutmut show <name>` shows each")
    for name, status in result["survivors"].items():
        print(f"  {name}  [{status}]")
    return returncode


if __name__ == "__main__":
    sys.exit(main())

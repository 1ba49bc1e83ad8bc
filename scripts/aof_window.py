"""Measure what Redis's ``appendfsync everysec`` leaves at risk of a host crash.

A private ``redis-server`` (``appendonly yes``, ``appendfsync everysec``) serves a router
(an in-process runtime with a simulated fleet) while closed-loop clients submit async requests;
every acknowledgement's wall-clock time is recorded. ``strace`` follows Redis's threads and
records each ``fdatasync``/``fsync`` call's start and end (wall-clock, microseconds).

Redis writes its append-only file before it replies, so an acknowledged request is in the
kernel's page cache when its client hears 202: a crash of the Redis *process* loses nothing
(tests/system/test_redis_outage.py). A crash of the *host* loses what no completed fsync
covered. An acknowledgement at ``t`` is counted durable when the first fsync that started after
``t`` ends (conservative: an fsync that started between Redis's write and its reply covered it
too, by at most the reply's latency). The window of an acknowledgement is that end minus ``t``;
the requests at risk at an instant are those acknowledged and not yet durable. The script
prints both, worst and median, and writes them as JSON.

    python scripts/aof_window.py --clients 16 --seconds 20 --json FILE

Needs ``redis-server`` and ``strace`` (with permission to trace a child process).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_request_router.bench.provenance import capture
from gpu_request_router.bench.report import print_table, write_json
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.runtime import Runtime
from gpu_request_router.store import RedisStore
from gpu_request_router.testing import RedisServer, chat, make_settings

# "<tid> <epoch> fdatasync(<fd>) = 0", or split in "<unfinished ...>" and "<... resumed>".
_CALL = re.compile(
    r"^(\d+)\s+(\d+\.\d+)\s+(?:(f(?:data)?sync)\(\d+|<\.\.\. (f(?:data)?sync) resumed)"
)


def fsyncs(trace: str) -> list[tuple[float, float]]:
    """The (start, end) wall-clock times of every completed fsync in an ``strace -f -ttt`` log."""
    started: dict[str, float] = {}
    done: list[tuple[float, float]] = []
    for line in trace.splitlines():
        match = _CALL.match(line)
        if match is None:
            continue
        tid, at = match.group(1), float(match.group(2))
        if match.group(3):  # a call starts (and ends on the same line unless unfinished)
            if "<unfinished ...>" in line:
                started[tid] = at
            elif line.rstrip().endswith("= 0"):
                done.append((at, at))
        elif tid in started and line.rstrip().endswith("= 0"):
            done.append((started.pop(tid), at))
    return sorted(done)


def windows(acks: list[float], synced: list[tuple[float, float]]) -> list[float]:
    """For each acknowledgement, how long until a completed fsync that started after it covered it.

    Acknowledgements after the last fsync's start are left out (the run ended first).
    """
    starts = [start for start, _ in synced]
    out = []
    for ack in acks:
        i = bisect.bisect_right(starts, ack)
        if i < len(synced):
            out.append(synced[i][1] - ack)
    return out


def most_at_risk(acks: list[float], synced: list[tuple[float, float]]) -> int:
    """The most acknowledged requests not yet durable at any one instant."""
    starts = [start for start, _ in synced]
    events: list[tuple[float, int]] = []
    for ack in acks:
        i = bisect.bisect_right(starts, ack)
        if i < len(synced):
            events += [(ack, 1), (synced[i][1], -1)]
    worst = current = 0
    for _, step in sorted(events, key=lambda e: (e[0], -e[1])):
        current += step
        worst = max(worst, current)
    return worst


async def load(url: str, clients: int, seconds: float) -> list[float]:
    """Closed-loop clients submitting short async requests; each acknowledgement's time."""
    settings = make_settings(gpus=[("H100-80GB", 8)], slots=64)
    acks: list[float] = []
    store = RedisStore(url, prefix="aof-window")
    async with Runtime.from_settings(settings, store=store) as runtime:
        stop = time.monotonic() + seconds

        async def client(i: int) -> None:
            caller = Caller(f"user{i}")
            while time.monotonic() < stop:
                await runtime.submit(chat(duration_s=0.01), caller)
                acks.append(time.time())

        await asyncio.gather(*(client(i) for i in range(clients)))
    store.close()
    return acks


def main() -> int:
    """Run the load under strace; print and write the figures; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    provenance = capture()
    strace = shutil.which("strace")
    if strace is None:
        print("strace is not installed (apt-get install strace)", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory() as directory,
        RedisServer(Path(directory), appendfsync="everysec") as server,
    ):
        assert server.process is not None
        log = Path(directory) / "strace.log"
        command = [strace, "-f", "-ttt", "-e", "trace=fsync,fdatasync", "-o", str(log)]
        tracer = subprocess.Popen(
            [*command, "-p", str(server.process.pid)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attached to every thread
        acks = asyncio.run(load(server.url, args.clients, args.seconds))
        time.sleep(2.5)  # the fsyncs that cover the last acknowledgements
        tracer.terminate()
        tracer.wait(10)
        synced = fsyncs(log.read_text())
    if not synced:
        print("no fsync was traced (is ptrace allowed here?)", file=sys.stderr)
        return 1
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(synced)]
    waits = windows(acks, synced)
    rate = len(acks) / args.seconds
    figures = {
        "appendfsync": "everysec",
        "clients": args.clients,
        "seconds": args.seconds,
        "acknowledged": len(acks),
        "acknowledged_per_s": round(rate, 1),
        "fsyncs": len(synced),
        "fsync_gap_median_s": round(statistics.median(gaps), 3),
        "fsync_gap_max_s": round(max(gaps), 3),
        "fsync_duration_max_s": round(max(end - start for start, end in synced), 4),
        "window_median_s": round(statistics.median(waits), 3),
        "window_max_s": round(max(waits), 3),
        "at_risk_max": most_at_risk(acks, synced),
    }
    print_table(
        "appendfsync everysec: acknowledged requests a host crash could lose",
        ["figure", "value"],
        [[name.replace("_", " "), str(value)] for name, value in figures.items()],
    )
    if args.json is not None:
        write_json(args.json, figures, provenance)
    return 0


if __name__ == "__main__":
    sys.exit(main())

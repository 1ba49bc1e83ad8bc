"""Three `gpurouter serve` replicas on one Redis prefix (``state.shared``), two real workers.

Every process is real: three routers and two ``gpurouter worker --simulate 2xH100-80GB``
agents on loopback, one Redis. The routers read the workers in turns (each about once per poll
interval between them) and each places from its own view;
the write script confirms every creation's limits and every dispatch's claim across the three.

- **Load** (SPEC I2, I4 across replicas): clients submit to the three routers in turn, a
  quarter as alice (30 requests a minute, 2 at once), the rest as bob. Alice gets exactly 30
  admitted across the three, the others 429. An auditor samples the reservation ledger and
  alice's slots in Redis every 50 ms: no GPU over its limit, never more than 2 slots. Every
  acknowledged request succeeds, once, readable from every router.
- **kill -9 of one replica of three**: clients of the other two see only 202s; clients of the
  killed one retry on the others by idempotency key. Its lease lapses and another router adopts
  its requests (re-attaching to the executions the workers still run) within the lease plus
  5 s; every acknowledged request ends once.

``GPUROUTER_SHARED_CLIENTS`` / ``GPUROUTER_SHARED_SECONDS`` size the load (``make test``: 24
clients for 8 s; the issue's run: 200 for 58 s) and ``GPUROUTER_SHARED_KILLS`` the kills (1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from routers import GPUROUTER, KEY, Processes, clean_environment, wait_answering

from gpu_request_router.http.keys import hash_key
from gpu_request_router.store import RedisStore
from gpu_request_router.testing import free_port

CLIENTS = int(os.environ.get("GPUROUTER_SHARED_CLIENTS", "24"))
SECONDS = float(os.environ.get("GPUROUTER_SHARED_SECONDS", "8"))
KILLS = int(os.environ.get("GPUROUTER_SHARED_KILLS", "1"))
WORKER_TOKEN = "shared-worker-token-0123456789ab"
BOB_KEY = "shared-bob-key"
LEASE_S = 2.0
MARGIN_MB = 1024
ALICE_RATE, ALICE_SLOTS = 30, 2
GPUS = ["w1:0", "w1:1", "w2:0", "w2:1"]

pytestmark = pytest.mark.xdist_group("system")


class Fleet(Processes):
    """Three routers sharing ``prefix`` and two simulated workers, all real processes."""

    def __init__(self, workdir: Path, redis_url: str, prefix: str) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.prefix = prefix
        super().__init__()
        self.ports = {name: free_port() for name in ("r0", "r1", "r2", "w1", "w2")}
        common = {
            "auth": {
                "users": [
                    {"name": "alice", "role": "user", "api_key_sha256": hash_key(KEY)},
                    {"name": "bob", "role": "user", "api_key_sha256": hash_key(BOB_KEY)},
                ],
                "worker_token": WORKER_TOKEN,
            },
            "logging": {"level": "warning", "format": "json"},
        }
        unlimited = dict.fromkeys(
            ("requests_per_minute", "max_queued", "max_concurrent", "gpu_seconds_per_hour")
        )
        for name in ("r0", "r1", "r2"):
            config = {
                **common,
                "server": {"port": self.ports[name]},
                "state": {
                    "backend": "redis",
                    "redis_url": redis_url,
                    "redis_prefix": prefix,
                    "shared": True,
                    "redis_lease_s": LEASE_S,
                },
                "quotas": {
                    "default": unlimited,
                    "users": {
                        "alice": {
                            "requests_per_minute": ALICE_RATE,
                            "max_concurrent": ALICE_SLOTS,
                        }
                    },
                },
                "placement": {"memory_safety_margin_mb": MARGIN_MB},
                "monitor": {"poll_interval_s": 0.2, "stale_after_s": 3.0},
                "backends": [
                    {"name": w, "kind": "agent", "url": self.url(w)} for w in ("w1", "w2")
                ],
            }
            (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config))
        (workdir / "worker.yaml").write_text(yaml.safe_dump(common))

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        log = self.workdir / f"{name}.log"
        if name.startswith("w"):
            args = ["worker", "--config", str(self.workdir / "worker.yaml"), "--name", name]
            args += ["--simulate", "2xH100-80GB", "--slots", "4", "--port", str(self.ports[name])]
            path = "/healthz"
        else:
            args, path = ["serve", "--config", str(self.workdir / f"{name}.yaml")], "/readyz"
        with log.open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [GPUROUTER, *args],
                cwd=self.workdir,
                stdout=out,
                stderr=out,
                env={**clean_environment(), "PYTHONUNBUFFERED": "1"},
            )
        wait_answering(self.url(name), self.processes[name], log, path, timeout_s=30)


@pytest.fixture
def fleet(tmp_path: Path, redis_url: str, redis_store_prefix: str) -> Iterator[Fleet]:
    """Two workers and three routers, started and ready; stopped afterwards."""
    started = Fleet(tmp_path, redis_url, redis_store_prefix)
    try:
        for name in ("w1", "w2", "r0", "r1", "r2"):
            started.start(name)
        yield started
    finally:
        started.stop()


def _body(duration_s: float, memory_mb: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "llama-3-8b",
        "input": {
            "messages": [{"role": "user", "content": "hi"}],
            "simulate": {"duration_s": duration_s},
        },
    }
    if memory_mb is not None:  # large enough that memory, not slots, binds a GPU
        body["resources"] = {"gpu_memory_mb": memory_mb}
    return body


@dataclass
class Load:
    """Submitting clients; each key goes to its router, then to the others until taken."""

    fleet: Fleet
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # key: (id, url)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # (user, status)
    admitted_at: dict[str, list[float]] = field(default_factory=dict)  # user: 202 times
    errors: list[str] = field(default_factory=list)  # what steady clients saw besides 202/429
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, name: str, user: str, routers: list[str], *, steady: bool) -> None:
        """Submit until stopped: to ``routers[0]``; a steady client accepts no error at all."""
        key_of = {"alice": KEY, "bob": BOB_KEY}[user]
        urls = [self.fleet.url(r) for r in routers]
        n = 0
        # Idle connections are dropped before the routers' 5 s keep-alive ends, so that a
        # request never races the server closing the connection it is sent on.
        limits = httpx.Limits(keepalive_expiry=2.0)
        headers = {"Authorization": f"Bearer {key_of}"}
        with httpx.Client(headers=headers, timeout=10, limits=limits) as client:
            while not self.stop.is_set():
                key = f"{name}-{n}"
                n += 1
                for turn in range(200):
                    url = urls[turn % len(urls)]
                    try:
                        response = client.post(
                            f"{url}/v1/requests",
                            json=_body(0.05 + (n % 5) * 0.05, 30_000 if n % 2 else None),
                            headers={"Idempotency-Key": key},
                        )
                        status = response.status_code
                    except httpx.HTTPError as exc:
                        status, response = 0, None
                        if steady:
                            with self.lock:
                                self.errors.append(f"{url}: {exc!r}")
                    with self.lock:
                        self.answers[user, status] += 1
                    if status == 202:
                        assert response is not None
                        request_id = response.json()["id"]
                        with self.lock:
                            self.acknowledged.setdefault(key, []).append((request_id, url))
                            self.admitted_at.setdefault(user, []).append(time.monotonic())
                        self._wait(client, urls[turn + 1 :] + urls[: turn + 1], request_id, steady)
                        break
                    if status == 429:
                        time.sleep(0.05)
                        break
                    if steady:
                        with self.lock:
                            self.errors.append(f"{url}: {status} {response and response.text}")
                        break
                    with self.lock:
                        self.retried += 1
                    time.sleep(0.05)

    def _wait(self, client: httpx.Client, urls: list[str], request_id: str, steady: bool) -> None:
        """Wait for the request to end (a closed loop), asking the next router first."""
        deadline = time.monotonic() + 60
        turn = 0
        while time.monotonic() < deadline and not self.stop.is_set():
            url = urls[turn % len(urls)]
            try:
                answer = client.get(f"{url}/v1/requests/{request_id}", params={"wait": 5})
            except httpx.HTTPError as exc:
                if steady:
                    with self.lock:
                        self.errors.append(f"{url}: wait: {exc!r}")
                turn += 1
                continue
            if answer.status_code != 200:
                if steady:
                    with self.lock:
                        self.errors.append(f"{url}: wait: {answer.status_code} {answer.text}")
                turn += 1
                continue
            if answer.json()["status"] in ("succeeded", "failed", "cancelled", "expired"):
                return


@dataclass
class Auditor:
    """Samples the reservation ledger and alice's slots in Redis every 50 ms."""

    redis_url: str
    prefix: str
    limit_mb: int
    stop: threading.Event = field(default_factory=threading.Event)
    samples: int = 0
    most_mb: dict[str, int] = field(default_factory=dict)
    most_slots: int = 0

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            while not self.stop.is_set():
                pipe = client.pipeline(transaction=True)  # one instant of the ledger
                for gpu in GPUS:
                    pipe.hvals(f"{self.prefix}:ledger:{gpu}")
                pipe.scard(f"{self.prefix}:active:alice")
                *ledgers, slots = pipe.execute()
                for gpu, values in zip(GPUS, ledgers, strict=True):
                    self.most_mb[gpu] = max(self.most_mb.get(gpu, 0), sum(map(int, values)))
                self.most_slots = max(self.most_slots, slots)
                self.samples += 1
                time.sleep(0.05)
        finally:
            client.close()


def _settle(fleet: Fleet, load: Load) -> dict[str, str]:
    """Every acknowledged request once it succeeded; its id by key (one per key)."""
    ids: dict[str, str] = {}
    for key, found in load.acknowledged.items():
        assert len({request_id for request_id, _ in found}) == 1, (key, found)  # one per key
        ids[key] = found[0][0]
    readers = [httpx.Client(base_url=fleet.url(r), timeout=10) for r in ("r0", "r1", "r2")]
    try:
        for n, (key, request_id) in enumerate(ids.items()):
            user_key = KEY if key.startswith("alice") else BOB_KEY
            reader = readers[n % 3]  # any router answers for any request
            deadline = time.monotonic() + 60
            while True:
                answer = reader.get(
                    f"/v1/requests/{request_id}", headers={"Authorization": f"Bearer {user_key}"}
                )
                assert answer.status_code == 200, answer.text
                if answer.json()["status"] in ("succeeded", "failed", "cancelled", "expired"):
                    assert answer.json()["status"] == "succeeded", (
                        answer.json()["error"],
                        answer.json()["attempts"],
                    )
                    break
                assert time.monotonic() < deadline, _story(fleet, request_id)
                time.sleep(0.05)
    finally:
        for reader in readers:
            reader.close()
    store = RedisStore(fleet.redis_url, prefix=fleet.prefix, shared=True)
    try:
        for request_id in ids.values():
            trail = store.transitions(request_id)
            assert [t.seq for t in trail] == list(range(len(trail))), trail
            assert [t.to_status.terminal for t in trail].count(True) == 1, trail
    finally:
        store.close()
    return ids


def _story(fleet: Fleet, request_id: str) -> str:
    """A request's status, owner and audit trail as stored (for a failure's message)."""
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        row = client.hmget(f"{fleet.prefix}:req:{request_id}", "status", "owner", "held")
        lines = [f"{request_id}: {row}"]
        lines += [
            entry.decode()[:300]
            for entry in client.lrange(f"{fleet.prefix}:trail:{request_id}", 0, -1)
        ]
    finally:
        client.close()
    return "\n".join(lines)


def _gpu_limit(fleet: Fleet) -> int:
    gpus = httpx.get(
        f"{fleet.url('r0')}/v1/gpus", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()
    items = gpus["items"] if isinstance(gpus, dict) else gpus
    assert sorted(gpu["id"] for gpu in items) == GPUS, items
    return min(gpu["memory_total_mb"] for gpu in items) - MARGIN_MB


def test_three_replicas_hold_quotas_and_gpu_limits_across_them(fleet: Fleet) -> None:
    """See the module docstring (load)."""
    load = Load(fleet)
    auditor = Auditor(fleet.redis_url, fleet.prefix, _gpu_limit(fleet))
    routers = ["r0", "r1", "r2"]
    threads = [threading.Thread(target=auditor.run)]
    for i in range(CLIENTS):
        user = "alice" if i % 4 == 0 else "bob"
        turn = routers[i % 3 :] + routers[: i % 3]
        threads.append(
            threading.Thread(
                target=load.run, args=(f"{user}-c{i}", user, turn), kwargs={"steady": True}
            )
        )
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(SECONDS)
    load.stop.set()
    for thread in threads[1:]:
        thread.join(timeout=60)
    elapsed = time.monotonic() - started
    ids = _settle(fleet, load)
    auditor.stop.set()
    threads[0].join(timeout=10)
    assert not load.errors, load.errors[:5]
    alice = sum(1 for key in ids if key.startswith("alice"))
    # Exactly the limit in the minute that starts with the first admission, and never more in
    # any minute (seen from the clients, so with a second's margin for their own timing).
    times = sorted(load.admitted_at["alice"])
    assert len([t for t in times if t - times[0] < 59.0]) == ALICE_RATE, (times, load.answers)
    assert all(len([u for u in times if t - 59.0 < u <= t]) <= ALICE_RATE for t in times), times
    assert load.answers["alice", 429] > 0
    assert auditor.samples > 0
    assert max(auditor.most_mb.values()) <= auditor.limit_mb, auditor.most_mb
    assert max(auditor.most_mb.values()) > 0  # the ledger was in use while sampled
    assert auditor.most_slots <= ALICE_SLOTS
    print(
        f"clients={CLIENTS} seconds={elapsed:.1f} acknowledged={len(ids)} alice_admitted={alice} "
        f"alice_429={load.answers['alice', 429]} ledger_samples={auditor.samples} "
        f"most_reserved_mb={auditor.most_mb} limit_mb={auditor.limit_mb} "
        f"alice_most_slots={auditor.most_slots} lost=0 duplicated=0"
    )


def _replica_of(fleet: Fleet, name: str) -> str:
    """The replica id router ``name`` registered under (its lease's key)."""
    pid = fleet.processes[name].pid
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        for replica, token in client.hgetall(f"{fleet.prefix}:replicas").items():
            if token.decode().split(":")[-2] == str(pid):
                return str(replica.decode())
    finally:
        client.close()
    raise AssertionError(f"router {name} (pid {pid}) is not registered")


def test_a_killed_replica_s_work_is_adopted_and_the_others_clients_see_no_error(
    fleet: Fleet,
) -> None:
    """See the module docstring (kill -9)."""
    load = Load(fleet)
    threads = []
    for i in range(12):
        if i % 3 == 0:  # the victim's clients fall back on the others
            turn, steady = ["r0", "r1", "r2"], False
        else:
            turn, steady = (["r1"] if i % 3 == 1 else ["r2"]), True
        threads.append(
            threading.Thread(
                target=load.run, args=(f"bob-k{i}", "bob", turn), kwargs={"steady": steady}
            )
        )
    for thread in threads:
        thread.start()
    adoptions: list[float] = []
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        for _ in range(KILLS):
            time.sleep(2.0)
            replica = _replica_of(fleet, "r0")
            fleet.kill("r0")
            killed = time.monotonic()
            while client.hexists(f"{fleet.prefix}:replicas", replica):
                assert time.monotonic() - killed < LEASE_S + 10, "nobody adopted the dead router"
                time.sleep(0.05)
            adoptions.append(time.monotonic() - killed)
            assert not client.exists(f"{fleet.prefix}:owned:{replica}")
            fleet.start("r0")
        time.sleep(2.0)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        client.close()
    ids = _settle(fleet, load)
    assert not load.errors, load.errors[:5]
    assert max(adoptions) <= LEASE_S + 5.0, adoptions
    print(
        f"kills={KILLS} acknowledged={len(ids)} retried_by_key={load.retried} "
        f"adoption_s={[round(a, 2) for a in adoptions]} lease_s={LEASE_S} lost=0 duplicated=0"
    )


def _registered(redis_url: str, prefix: str, *, listed_only: bool = False) -> set[int]:
    """The pids of the routers registered on ``prefix`` whose lease lives (or listed at all)."""
    client = redis.Redis.from_url(redis_url)
    try:
        pids = set()
        for replica, token in client.hgetall(f"{prefix}:replicas").items():
            if listed_only or client.exists(f"{prefix}:replica:{replica.decode()}"):
                pids.add(int(token.decode().split(":")[-2]))
        return pids
    finally:
        client.close()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a child the supervisor has not reaped counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_workers_runs_n_routers_on_one_port_and_restarts_one_that_dies(
    tmp_path: Path, redis_url: str, redis_store_prefix: str
) -> None:
    """`serve --workers 2`: two routers share the port and the prefix; a killed one comes back.

    So does one that was paused past its lease (its work adopted, it is fenced). SIGTERM to the
    supervisor stops both (exit 0); SIGKILL to it ends them too. The SQLite store is refused
    (exit 2).
    """
    port = free_port()
    config = {
        "server": {"port": port},
        "auth": {"users": [{"name": "alice", "role": "user", "api_key_sha256": hash_key(KEY)}]},
        "state": {
            "backend": "redis",
            "redis_url": redis_url,
            "redis_prefix": redis_store_prefix,
            "shared": True,
            "redis_lease_s": LEASE_S,
        },
        "logging": {"level": "warning", "format": "json"},
    }
    path = tmp_path / "workers.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "workers.log"

    def start() -> subprocess.Popen[bytes]:
        """`gpurouter serve --workers 2` on the configuration, logging to ``log``."""
        with log.open("ab") as out:
            return subprocess.Popen(
                [GPUROUTER, "serve", "--config", str(path), "--workers", "2"],
                cwd=tmp_path,
                stdout=out,
                stderr=out,
                env={**clean_environment(), "PYTHONUNBUFFERED": "1"},
            )

    supervisor = start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answering(url, supervisor, log, "/readyz", timeout_s=30)
        deadline = time.monotonic() + 30
        while len(pids := _registered(redis_url, redis_store_prefix)) < 2:
            assert time.monotonic() < deadline, pids
            time.sleep(0.1)
        assert supervisor.pid not in pids
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        while True:  # the supervisor starts another in its place
            now = _registered(redis_url, redis_store_prefix)
            if victim not in now and len(now) == 2:
                break
            assert time.monotonic() < deadline + 30, now
            time.sleep(0.1)
        # A child paused past its lease is adopted by the other (fenced); resumed, it stops
        # with EXIT_FENCED and the supervisor starts another in its place.
        paused = min(now)
        os.kill(paused, signal.SIGSTOP)
        try:
            while paused in _registered(redis_url, redis_store_prefix, listed_only=True):
                assert time.monotonic() < deadline + 60
                time.sleep(0.1)
        finally:
            os.kill(paused, signal.SIGCONT)
        while True:
            now = _registered(redis_url, redis_store_prefix)
            if paused not in now and len(now) == 2 and not _alive(paused):
                break
            assert time.monotonic() < deadline + 90, now
            time.sleep(0.1)
        assert "router_stopping" in log.read_text()
        headers = {"Authorization": f"Bearer {KEY}"}
        for _ in range(6):  # either process answers, and both see the same requests
            response = httpx.post(f"{url}/v1/requests", json=_body(0.01, None), headers=headers)
            assert response.status_code == 202, response.text
            done = httpx.get(
                f"{url}/v1/requests/{response.json()['id']}",
                params={"wait": 10},
                headers=headers,
                timeout=15,
            )
            assert done.json()["status"] == "succeeded", done.text
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        assert not _registered(redis_url, redis_store_prefix)  # both left, leases released
        # A supervisor killed outright takes its routers with it (nothing serves unsupervised).
        supervisor = start()
        wait_answering(url, supervisor, log, "/readyz", timeout_s=30)
        deadline = time.monotonic() + 30
        while len(children := _registered(redis_url, redis_store_prefix)) < 2:
            assert time.monotonic() < deadline, children
            time.sleep(0.1)
        supervisor.kill()
        supervisor.wait(10)
        while any(_alive(child) for child in children):
            assert time.monotonic() < deadline + 30, [c for c in children if _alive(c)]
            time.sleep(0.1)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
    config["state"] = {"backend": "sqlite", "sqlite_path": str(tmp_path / "r.db")}
    path.write_text(yaml.safe_dump(config))
    refused = subprocess.run(
        [GPUROUTER, "serve", "--config", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_environment(),
    )
    assert refused.returncode == 2, refused
    assert "state.shared true" in refused.stdout + refused.stderr

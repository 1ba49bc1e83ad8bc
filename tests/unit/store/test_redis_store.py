"""What the Redis store adds to the store contract: one owner, fencing, lost replies, outages.

Everything runs against real Redis servers: the shared one of ``REDIS_URL`` under a prefix of
each test's own, or a private ``redis-server`` a test kills (``RedisServer``). A lost reply is
made by a real TCP proxy on loopback that cuts the connection after Redis ran the write.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from changes import T0, add, created, make_request, moved

from gpu_request_router.config.config_loader import StateSettings
from gpu_request_router.exceptions import StoreInUse, StoreUnavailable
from gpu_request_router.models.request import RequestStatus
from gpu_request_router.store import (
    MemoryStore,
    RedisStore,
    RequestQuery,
    StateStore,
    open_store,
    redis_store,
)
from gpu_request_router.testing import RedisServer

S = RequestStatus


def wait_until(condition: object, timeout_s: float) -> float:
    """Poll ``condition()`` every 20 ms until true; return the seconds it took (fail after)."""
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not true within {timeout_s} s")
        time.sleep(0.02)
    return time.monotonic() - start


# --- one owner per prefix -------------------------------------------------------------------------


def test_a_second_router_on_a_prefix_waits_one_lease_then_is_refused(
    redis_url: str, redis_store_prefix: str
) -> None:
    """The holder is named (its pid), and the holder goes on writing."""
    holder = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreInUse) as refused:
            RedisStore(redis_url, prefix=redis_store_prefix, lease_s=0.5)
        waited = time.monotonic() - started
        assert waited >= 0.5  # it waited for the lease to lapse: a live holder renews it
        assert refused.value.pid == os.getpid()
        assert redis_store_prefix in refused.value.message
        add(holder, make_request("r1"))
        assert holder.get_request("r1") is not None
    finally:
        holder.close()


def test_the_configured_store_takes_its_prefix_lease_and_standby_from_the_settings(
    redis_url: str, redis_store_prefix: str
) -> None:
    """``state.redis_*`` and ``state.standby`` reach the store ``open_store`` opens."""
    settings = StateSettings(
        backend="redis",
        redis_url=redis_url,
        redis_prefix=redis_store_prefix,
        redis_lease_s=2.0,
        standby=True,
        retention_days=1,
    )
    store = open_store(settings)
    try:
        assert isinstance(store, RedisStore)
        assert (store.prefix, store.lease_s, store.standby, store.retention_s) == (
            redis_store_prefix,
            2.0,
            True,
            86_400.0,
        )
        raw = redis.Redis.from_url(redis_url)
        assert 0 < raw.pttl(f"{redis_store_prefix}:owner") <= 2000
        raw.close()
    finally:
        store.close()


def test_a_closed_owner_hands_the_prefix_over_at_once(
    redis_url: str, redis_store_prefix: str
) -> None:
    """Closing gives the lease up: the next router does not wait for it (30 s here)."""
    first = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=30)
    add(first, make_request("r1"))
    first.close()
    started = time.monotonic()
    second = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=30)
    try:
        assert time.monotonic() - started < 5
        assert [r.id for r in second.unfinished_requests()] == ["r1"]
    finally:
        second.close()


def test_a_standby_waits_while_the_holder_lives_and_takes_over_when_it_stops(
    redis_url: str, redis_store_prefix: str
) -> None:
    """Not refused after a lease, three leases on; the prefix is its own once the holder closes."""
    holder = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=0.5)
    add(holder, make_request("r1"))
    opened: list[RedisStore] = []
    standby = threading.Thread(
        target=lambda: opened.append(
            RedisStore(redis_url, prefix=redis_store_prefix, lease_s=0.5, standby=True)
        )
    )
    standby.start()
    try:
        time.sleep(1.5)
        assert standby.is_alive() and not opened
        holder.close()
        standby.join(timeout=2)
        assert not standby.is_alive()
        (taken,) = opened
        assert [r.id for r in taken.unfinished_requests()] == ["r1"]
        add(taken, make_request("r2"))
        taken.close()
    finally:
        holder.close()
        standby.join(timeout=5)


_HOLD = """
import sys, time
from gpu_request_router.store import RedisStore
store = RedisStore(sys.argv[1], prefix=sys.argv[2], lease_s=1.0)
print("holding", flush=True)
time.sleep(120)
"""


def test_a_killed_owners_lease_lapses_and_the_next_router_takes_over(
    redis_url: str, redis_store_prefix: str
) -> None:
    """``kill -9`` leaves the lease behind; it lapses within a lease and the next one starts."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, redis_url, redis_store_prefix],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        for line in holder.stdout:  # after the store's log lines
            if line.strip() == "holding":
                break
        holder.kill()
        holder.wait(timeout=10)
        started = time.monotonic()
        store = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=1.0)
        waited = time.monotonic() - started
        store.close()
        assert 0 < waited < 1.0 + 1.0 + 1.0  # the lease, a renewal period, and some slack
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_router_that_lost_its_lease_never_writes_again(
    redis_url: str, redis_store_prefix: str
) -> None:
    """Another router took the prefix (this one's lease lapsed): every write is refused."""
    store = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=30)
    raw = redis.Redis.from_url(redis_url)
    try:
        add(store, make_request("r1"))
        raw.set(f"{redis_store_prefix}:owner", "otherhost:1:abc")
        with pytest.raises(StoreUnavailable, match="took over"):
            store.write([created(make_request("r2"))])
        assert store.get_request("r2") is None
        with pytest.raises(StoreUnavailable, match="took over"):
            store.check_writable(T0)
        assert store.failure() is not None
        store.close()  # does not delete the new owner's lease
        assert raw.get(f"{redis_store_prefix}:owner") == b"otherhost:1:abc"
    finally:
        raw.close()


def test_a_lapsed_lease_is_taken_back_only_while_nobody_took_the_prefix_since(
    redis_url: str, redis_store_prefix: str
) -> None:
    """A lease lapsed (Redis down past it) is taken back by its holder's next write.

    Had another router taken the prefix meanwhile (and let it go), the holder is fenced.
    """
    store = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=30)
    raw = redis.Redis.from_url(redis_url)
    owner, epoch = f"{redis_store_prefix}:owner", f"{redis_store_prefix}:epoch"
    try:
        token = raw.get(owner)
        raw.delete(owner)  # lapsed
        add(store, make_request("r1"))
        assert raw.get(owner) == token
        raw.delete(owner)
        raw.incr(epoch)  # another router took it, and closed
        with pytest.raises(StoreUnavailable, match="took over"):
            store.write([created(make_request("r2"))])
        assert raw.get(owner) is None
        assert store.get_request("r2") is None
    finally:
        store.close()
        raw.close()


def test_listing_walks_chunks_through_ties_as_the_memory_store_lists(
    redis_url: str, redis_store_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 3 over many equal creation times: the same pages as the memory store's."""
    monkeypatch.setattr(redis_store, "_LIST_CHUNK", 3)
    store = RedisStore(redis_url, prefix=redis_store_prefix)
    memory = MemoryStore()
    try:
        for index in range(25):
            request = make_request(
                f"r{index:02d}",
                created_at=T0 + index // 4,
                user="alice" if index % 3 else "bob",
                model="m1" if index % 2 else "m2",
            )
            changes = [created(request)]
            if index % 5 == 0:
                changes.append(moved(request, S.CANCELLED, T0 + 30))
            for target in (store, memory):
                target.write(changes)
        queries = [
            RequestQuery(limit=4),
            RequestQuery(limit=2, user="bob"),
            RequestQuery(limit=3, model="m1", statuses=frozenset({S.CANCELLED})),
            RequestQuery(limit=5, statuses=frozenset({S.QUEUED})),
        ]
        for query in queries:
            assert pages(store, query) == pages(memory, query), query
    finally:
        store.close()


def pages(store: StateStore, query: RequestQuery) -> list[list[str]]:
    """Every page of ``query``, as ids."""
    found, cursor = [], None
    while True:
        page = store.list_requests(replace(query, cursor=cursor))
        found.append([r.id for r in page.items])
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


def test_unfinished_old_requests_never_hold_up_the_retention(
    redis_url: str, redis_store_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More unfinished requests past the cutoff than one prune takes: finished ones still go."""
    monkeypatch.setattr(redis_store, "RETENTION_BATCH", 2)
    store = RedisStore(redis_url, prefix=redis_store_prefix, retention_s=100)
    try:
        for index in range(3):
            add(store, make_request(f"waiting{index}", created_at=T0 + index))
        for index in range(2):
            done = make_request(f"done{index}", created_at=T0 + 10 + index)
            store.write([created(done), moved(done, S.CANCELLED, T0 + 20)])
        add(store, make_request("later", created_at=T0 + 200))
        assert [store.get_request(f"done{i}") for i in range(2)] == [None, None]
        assert len(store.unfinished_requests()) == 4
    finally:
        store.close()


def test_a_closed_store_refuses_writes_and_leaves_the_lease_alone(
    redis_url: str, redis_store_prefix: str
) -> None:
    """After close, a write is refused and does not take the prefix back."""
    store = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=30)
    raw = redis.Redis.from_url(redis_url)
    try:
        store.close()
        with pytest.raises(StoreUnavailable, match="closed"):
            store.write([created(make_request("r1"))])
        with pytest.raises(StoreUnavailable, match="closed"):
            store.check_writable(T0)
        assert raw.get(f"{redis_store_prefix}:owner") is None
    finally:
        raw.close()


def test_a_closed_store_refuses_reads_without_opening_a_connection(
    redis_url: str, redis_store_prefix: str
) -> None:
    """A read after close is refused: it would open a connection that nobody closes.

    (A thread the runtime left running may still read; the store's pool stays empty.)
    """
    store = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=30)
    store.write([created(make_request("r1"))])
    assert store.get_request("r1") is not None
    store.close()
    pool = store._redis.connection_pool
    opened = pool._created_connections
    with pytest.raises(StoreUnavailable, match="closed"):
        store.get_request("r1")
    with pytest.raises(StoreUnavailable, match="closed"):
        store.unfinished_requests()
    assert pool._created_connections == opened
    assert all(c._sock is None for c in pool._available_connections)  # every socket closed


# --- a lost reply ------------------------------------------------------------------------------


class CuttingProxy:
    """A TCP proxy to Redis that, armed, cuts the next write batch's connection after its answer.

    Redis has run the batch; the client never reads the reply.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            marked = threading.Event()
            threading.Thread(target=self._up, args=(client, server, marked), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, marked), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, marked: threading.Event) -> None:
        while data := _recv(client):
            if self.armed.is_set() and b'"c":[[' in data:
                self.armed.clear()
                marked.set()
            server.sendall(data)
        server.close()

    def _down(self, server: socket.socket, client: socket.socket, marked: threading.Event) -> None:
        while data := _recv(server):
            if marked.is_set():  # Redis ran the batch and answered: the answer is lost
                self.cut.set()
                client.shutdown(socket.SHUT_RDWR)
                client.close()
                server.close()
                return
            client.sendall(data)
        client.close()

    def close(self) -> None:
        self.listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_a_batch_whose_reply_is_lost_is_taken_back_and_changes_carried_again_land_once(
    redis_url: str, redis_store_prefix: str
) -> None:
    """A lost reply's creations are taken back, and its changes carried again land once.

    The router refused what the lost batch created (503) and carries its other changes again.
    """
    upstream = redis.Redis.from_url(redis_url)
    database = upstream.connection_pool.connection_kwargs.get("db", 0)
    port = upstream.connection_pool.connection_kwargs.get("port", 6379)
    proxy = CuttingProxy(port)
    store = RedisStore(
        f"redis://127.0.0.1:{proxy.port}/{database}",
        prefix=redis_store_prefix,
        lease_s=30,
        timeout_s=5.0,  # through the test's own proxy, on a busy machine
    )
    try:
        first = add(store, make_request("r1"))
        lost = make_request("r2", key="k2")
        dispatch = moved(first, S.DISPATCHING, T0 + 1)
        proxy.armed.set()
        with pytest.raises(StoreUnavailable):
            store.write([created(lost), dispatch])
        assert proxy.cut.is_set()
        assert upstream.exists(f"{redis_store_prefix}:req:r2")  # Redis did write it
        store.check_writable(T0)  # the writer's probe: writable only once r2 is taken back
        assert not upstream.exists(f"{redis_store_prefix}:req:r2")
        store.write([dispatch, created(make_request("r3"))])  # the writer carries r1's change
        assert store.get_request("r2") is None
        assert store.find_idempotent("alice", "k2") is None
        assert [t.seq for t in store.transitions("r1")] == [0, 1]
        assert store.get_request("r1").status is S.DISPATCHING  # type: ignore[union-attr]
        assert [r.id for r in store.unfinished_requests()] == ["r1", "r3"]
        history = store.quota_history(T0 + 2, 60.0, 3600.0)
        assert sorted(a[2] for a in history.admissions) == ["r1", "r3"]
    finally:
        store.close()
        proxy.close()
        upstream.close()


# --- Redis goes away and comes back --------------------------------------------------------------


def test_while_redis_is_down_calls_fail_fast_and_it_is_used_again_once_back(
    tmp_path: Path,
) -> None:
    """Redis killed: calls fail within a second; back: used again within seconds, data kept.

    The outage is known without a call (the lease thread), and the AOF kept what was written.
    """
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, prefix="p", lease_s=5)
        try:
            add(store, make_request("r1"))
            server.kill()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.write([created(make_request("r2"))])
            with pytest.raises(StoreUnavailable):
                store.get_request("r1")
            assert time.monotonic() - started < 1.0
            wait_until(lambda: store.failure() is not None, 2.0)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.ping()  # fails without waiting on a socket
            assert time.monotonic() - started < 0.1
            server.start()
            wait_until(lambda: store.failure() is None, 3.0)
            store.check_writable(T0)
            assert store.get_request("r1") is not None
            add(store, make_request("r3"))
            assert [r.id for r in store.unfinished_requests()] == ["r1", "r3"]
        finally:
            store.close()

"""A stateful hypothesis test of the Redis store: writes, lost answers, settling and restarts.

The store writes through a real TCP proxy that, when told, cuts a batch's connection after
Redis ran it (the answer is lost). The machine hands the store what the router's writer would:
a lost batch's creations are refused (their callers got 503) and its other changes are carried
into the next write. A restart closes the store and opens a new one on the same prefix. After
every step, against a model built from what was acknowledged:

- I1: every acknowledged request is stored once, as its last acknowledged change left it, with
  its whole audit trail (seqs 0..version, at most one terminal entry, and one if it ended);
- a refused creation is gone once the store is writable again (the probe, or the next write);
- recovery (``unfinished_requests``) and the idempotency keys agree with the model.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
import redis
from changes import T0, created, make_request, moved
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_redis_store import CuttingProxy

from gpu_request_router.core.state_store import Change
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import Request, RequestStatus
from gpu_request_router.store import RedisStore
from gpu_request_router.testing import drop_redis_prefix, redis_prefix, require_redis

S = RequestStatus
# Through the test's own Python proxy, on a machine the whole suite keeps busy, a call can take
# longer than the store's default half second: the timeout is not what this machine tests.
PROXIED_TIMEOUT_S = 5.0
# The next status of a request in this machine, in the order the core moves it.
NEXT = {
    S.QUEUED: [S.DISPATCHING, S.CANCELLED],
    S.DISPATCHING: [S.RUNNING, S.QUEUED],
    S.RUNNING: [S.SUCCEEDED, S.FAILED],
}


class RedisStoreMachine(RuleBasedStateMachine):
    """See the module docstring."""

    @initialize()
    def open(self) -> None:
        self.url = require_redis()
        self.prefix = redis_prefix()
        upstream = redis.Redis.from_url(self.url)
        kwargs: dict[str, Any] = upstream.connection_pool.connection_kwargs
        self.raw = upstream
        self.proxy = CuttingProxy(int(kwargs.get("port", 6379)))
        self.proxied = f"redis://127.0.0.1:{self.proxy.port}/{kwargs.get('db', 0)}"
        self.store = RedisStore(
            self.proxied, prefix=self.prefix, lease_s=30, timeout_s=PROXIED_TIMEOUT_S
        )
        self.now = T0
        self.count = 0
        self.live: dict[str, Request] = {}  # acknowledged, as acknowledged
        self.refused: set[str] = set()
        self.carried: list[Change] = []
        self.settled = True

    def _open_store(self) -> RedisStore:
        return RedisStore(self.proxied, prefix=self.prefix, lease_s=30, timeout_s=PROXIED_TIMEOUT_S)

    def teardown(self) -> None:
        store = getattr(self, "store", None)
        if store is None:
            return
        store.close()
        self.proxy.close()
        self.raw.close()
        drop_redis_prefix(self.url, self.prefix)

    def _new(self, keyed: bool) -> Request:
        self.count += 1
        self.now += 1
        rid = f"r{self.count:03d}"
        return make_request(rid, created_at=self.now, key=f"k{self.count}" if keyed else None)

    def _write(self, changes: list[Change], *, cut: bool) -> bool:
        """Write what the writer would (carried changes first); whether it was acknowledged."""
        batch = [*self.carried, *changes]
        if cut:
            self.proxy.armed.set()
        try:
            self.store.write(batch)
        except StoreUnavailable:
            assert cut, "only a cut connection fails here"
            assert self.proxy.cut.is_set()
            self.proxy.cut.clear()
            for change in batch:
                if change.created:
                    self.refused.add(change.request.id)
            self.carried = [c for c in batch if not c.created]
            self.settled = False
            return False
        self.proxy.armed.clear()
        self.carried = []
        self.settled = True
        for change in batch:
            self.live[change.request.id] = change.request
        return True

    @rule(keyed=st.booleans(), cut=st.booleans())
    def create(self, keyed: bool, cut: bool) -> None:
        self._write([created(self._new(keyed))], cut=cut)

    @precondition(lambda self: any(not r.status.terminal for r in self.live.values()))
    @rule(data=st.data(), cut=st.booleans(), with_creation=st.booleans())
    def move(self, data: st.DataObject, cut: bool, with_creation: bool) -> None:
        moving = [r for r in self.live.values() if not r.status.terminal]
        request = data.draw(st.sampled_from(sorted(moving, key=lambda r: r.id)))
        pending = [c.request for c in self.carried if c.request.id == request.id]
        current = pending[-1] if pending else request
        if current.status.terminal:
            return
        to = data.draw(st.sampled_from(NEXT[current.status]))
        self.now += 1
        changes: list[Change] = [moved(current.snapshot(), to, self.now)]
        if with_creation:
            changes.append(created(self._new(keyed=True)))
        self._write(changes, cut=cut)

    @rule()
    def probe(self) -> None:
        """The writer's probe: writable only once the lost batches are taken back."""
        self.store.check_writable(self.now)
        self.settled = True

    @rule()
    def restart(self) -> None:
        """The router stops (its close settles what is in doubt) and a new one opens.

        What its writer still carried dies with it; a carried change Redis ran before its
        answer was lost is what the next router recovers, so the model takes it.
        """
        self.store.close()
        self.store = RedisStore(
            self.proxied, prefix=self.prefix, lease_s=30, timeout_s=PROXIED_TIMEOUT_S
        )
        for change in self.carried:
            stored = self.store.get_request(change.request.id)
            assert stored is not None
            if stored.version == change.request.version:
                self.live[change.request.id] = change.request
        self.carried = []
        self.settled = True

    def _expected(self, request_id: str) -> list[Request]:
        """The states a request may be stored in: acknowledged, or carried (run, answer lost)."""
        states = [self.live[request_id]]
        states += [c.request for c in self.carried if c.request.id == request_id]
        return states

    @invariant()
    def acknowledged_requests_are_stored_whole(self) -> None:
        if not hasattr(self, "store"):
            return
        for request_id in self.live:
            stored = self.store.get_request(request_id)
            assert stored is not None, request_id
            states = {(r.status, r.version) for r in self._expected(request_id)}
            assert (stored.status, stored.version) in states, (request_id, stored.status)
            trail = self.store.transitions(request_id)
            assert [t.seq for t in trail] == list(range(stored.version + 1))
            assert sum(t.to_status.terminal for t in trail) == int(stored.status.terminal)

    @invariant()
    def refused_creations_are_gone_once_settled(self) -> None:
        if not hasattr(self, "store") or not self.settled:
            return
        for request_id in self.refused:
            assert self.store.get_request(request_id) is None, request_id
        for request in self.live.values():
            if request.idempotency_key is not None:
                found = self.store.find_idempotent("alice", request.idempotency_key)
                assert found is not None and found.id == request.id

    @invariant()
    def recovery_sees_what_was_acknowledged(self) -> None:
        if not hasattr(self, "store") or not self.settled or self.carried:
            return
        unfinished = [r.id for r in self.store.unfinished_requests()]
        expected = sorted(
            (r for r in self.live.values() if not r.status.terminal),
            key=lambda r: r.created_at,
        )
        assert unfinished == [r.id for r in expected]


@pytest.mark.usefixtures("redis_url")
def test_the_redis_store_keeps_what_it_acknowledged_through_lost_answers_and_restarts() -> None:
    """Run the machine (see the module docstring)."""
    run = RedisStoreMachine.TestCase
    run.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
    run().runTest()

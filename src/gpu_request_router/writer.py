"""The single writer: group commit of the core's changes to the state store.

The core decides in memory; what must persist comes out with its decisions and the runtime hands
it here. One task commits, on a thread of its own (a commit never blocks the event loop), whatever
is waiting when its previous commit ends, with no added delay: under load many requests share
one commit, alone each gets its own at once. A request's creation and its first status changes,
when they fall together, go in one transaction; the store writes the row once.

- **Durable changes** (:meth:`Writer.add`) come in groups, one per event; a group's future is
  settled when its changes are committed (or, for creations the store refused, dropped).
- **Changes written behind** (:meth:`Writer.add_behind`: the usage of synchronous requests) ride
  with the next commit, and are committed at most :data:`BEHIND_S` after they arrive.
- **A failed commit** changes nothing in the store. The requests it would have created are
  refused (``on_refused``: each waiter gets 503, and the core takes them back); every other
  change is kept, in order, and tried again after a pause that grows to
  :data:`RETRY_MAX_S`; with nothing left to try again, the store is probed
  (:meth:`~gpu_request_router.core.state_store.StateStore.check_writable`) at that pace until it
  takes writes. While commits fail, and while more than ``max_pending`` changes wait,
  :meth:`Writer.admitting` refuses new work with 503 and ``Retry-After`` (back-pressure): memory
  never grows without bound.
- **What a shared store refused** (``StateStore.write`` returns it: a creation over a limit
  across routers, a claim another router's reservations leave no room for) goes to
  ``on_refusals`` once the rest of the commit is visible; a refused creation's changes are not
  made visible (none was written).
- **A batch the store refuses for good** (not ``StoreUnavailable``: a bug, or a row written behind
  the router's back that a change collides with) is logged with its traceback and committed one
  event at a time; what is refused again is dropped (logged, its creations refused), so one bad
  change never blocks the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import structlog

from gpu_request_router.core.state_store import Change, Refusal, StateChange, StateStore
from gpu_request_router.exceptions import StoreUnavailable

__all__ = ["BEHIND_S", "MAX_PENDING", "RETRY_MAX_S", "Writer"]

_log = structlog.get_logger(__name__)

BEHIND_S = 0.5
"""The longest a change written behind waits for its commit (the contract says within 1 s)."""

MAX_PENDING = 50_000
"""Changes waiting for a commit beyond which new work is refused (back-pressure)."""

RETRY_MAX_S = 1.0
"""The longest pause between two tries of a commit that failed."""


class _Group:
    """The changes of one event, and the future settled once they are committed or dropped."""

    __slots__ = ("changes", "done")

    def __init__(self, changes: list[Change], done: asyncio.Future[None]) -> None:
        self.changes = changes
        self.done = done


class Writer:
    """Commits changes in batches; see the module docstring.

    Args:
        store: where the changes go.
        on_committed: called on the event loop once a commit is durable, with its durable
            changes and those written behind, each in order (to make them visible).
        on_refused: called with the ids of the requests whose creation a failed commit held,
            and the failure; their changes are dropped.
        on_refusals: called on the event loop, after ``on_committed`` and before the groups are
            settled, with what a shared store refused in a commit.
        max_pending: see :meth:`admitting`.
    """

    def __init__(
        self,
        store: StateStore,
        clock: Callable[[], float],
        *,
        on_committed: Callable[[Sequence[Change], Sequence[Change]], None],
        on_refused: Callable[[set[str], StoreUnavailable], None],
        on_refusals: Callable[[list[Refusal]], None] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_committed = on_committed
        self._on_refused = on_refused
        self._on_refusals = on_refusals
        self._max_pending = max_pending
        self._groups: list[_Group] = []
        self._behind: list[Change] = []
        self._behind_since: float | None = None
        self._pending = 0
        self._failure: StoreUnavailable | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpurouter-writer")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0

    # Input -----------------------------------------------------------------------------------

    def add(self, changes: list[Change]) -> asyncio.Future[None]:
        """Queue one event's durable changes; the future is settled once they are committed."""
        done = asyncio.get_running_loop().create_future()
        if not changes:
            done.set_result(None)
            return done
        self._groups.append(_Group(changes, done))
        self._pending += len(changes)
        self._idle.clear()
        self._wake.set()
        return done

    def add_behind(self, changes: list[Change]) -> None:
        """Queue changes to be committed within :data:`BEHIND_S` (or with the next commit)."""
        if not changes:
            return
        if self._behind_since is None:
            self._behind_since = asyncio.get_running_loop().time()
        self._behind.extend(changes)
        self._pending += len(changes)
        self._idle.clear()
        self._wake.set()

    def admitting(self) -> None:
        """Return if new work may be taken, else raise why not.

        Raises:
            StoreUnavailable: the last commit failed (the store is down, the disk full), the
                store knows it cannot be used (``StateStore.failure``), or more than
                ``max_pending`` changes wait for a commit.
        """
        if self._failure is not None:
            raise StoreUnavailable(self._failure.message, retry_after_s=RETRY_MAX_S)
        known = self._store.failure()
        if known is not None:
            raise StoreUnavailable(known, retry_after_s=RETRY_MAX_S)
        if self._pending > self._max_pending:
            raise StoreUnavailable(
                f"the state store is behind: {self._pending} changes wait for a commit",
                retry_after_s=RETRY_MAX_S,
            )

    @property
    def failure(self) -> StoreUnavailable | None:
        """Why the last commit failed, or ``None`` once one succeeds."""
        return self._failure

    @property
    def pending(self) -> int:
        """How many changes wait for a commit."""
        return self._pending

    async def flushed(self) -> None:
        """Return once nothing waits for a commit."""
        await self._idle.wait()

    # The loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start committing (on the running loop)."""
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Commit what waits (giving up after one failed try), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.02
        while True:
            if self._failure is not None and not (self._groups or self._behind or self._closing):
                # Nothing to try again: probe the store until it takes writes.
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                try:
                    await loop.run_in_executor(
                        self._executor, self._store.check_writable, self._clock()
                    )
                except StoreUnavailable as exc:
                    self._failure = exc
                    continue
                self._failure = None
                delay = 0.02
                continue
            await self._wake.wait()
            self._wake.clear()
            if self._closing and not (self._groups or self._behind):
                return
            if not self._groups and not self._closing:
                if not self._behind:
                    continue
                # Only changes written behind: let more join them, up to their deadline.
                assert self._behind_since is not None
                wait = self._behind_since + BEHIND_S - loop.time()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    self._wake.clear()
            try:
                await self._commit()
            except StoreUnavailable:
                if self._closing:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                self._wake.set()
                continue
            delay = 0.02
            if self._groups or self._behind or self._closing:
                self._wake.set()

    async def _commit(self) -> None:
        """Commit everything waiting now, in one transaction; settle or keep it."""
        groups, behind = self._groups, self._behind
        self._groups, self._behind, self._behind_since = [], [], None
        batch = [change for group in groups for change in group.changes] + behind
        try:
            refusals = await self._write(batch)
        except StoreUnavailable as exc:
            if self._failure is None:
                _log.warning("commit_failed", error=exc.message, changes=len(batch))
            self._failed(groups, behind, exc)
            raise
        except Exception:
            _log.exception("commit_refused", changes=len(batch))
            await self._one_by_one(groups, behind)
            return
        self._done(groups, behind, refusals)

    async def _write(self, changes: list[Change]) -> list[Refusal]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._store.write, changes)

    def _done(
        self, groups: list[_Group], behind: list[Change], refusals: list[Refusal] | None = None
    ) -> None:
        """A commit succeeded: count it, make its changes visible, settle its groups.

        The changes of creations the store refused were not written: they stay invisible.
        """
        durable = [change for group in groups for change in group.changes]
        self.commits += 1
        self._failure = None
        self._pending -= len(durable) + len(behind)
        if not (self._groups or self._behind):
            self._idle.set()
        dropped = {r.request_id for r in refusals or () if r.creation}
        if dropped:
            durable = _without(durable, dropped)
        self._on_committed(durable, behind)
        if refusals and self._on_refusals is not None:
            self._on_refusals(refusals)
        if dropped:
            self._purge(dropped)
        for group in groups:
            if not group.done.done():
                group.done.set_result(None)

    def _purge(self, request_ids: set[str]) -> None:
        """Drop the waiting changes of requests whose creation was refused (never written).

        Called once the refusal was handed over: what the core decided for them meanwhile (a
        dispatch by the pass that took back another refused request, say) goes too.
        """
        for group in self._groups:
            kept = _without(group.changes, request_ids)
            self._pending -= len(group.changes) - len(kept)
            group.changes = kept
        kept = _without(self._behind, request_ids)
        self._pending -= len(self._behind) - len(kept)
        self._behind = kept

    async def _one_by_one(self, groups: list[_Group], behind: list[Change]) -> None:
        """Commit a batch the store refused for good, one event at a time.

        A refusal that waiting does not lift (a bug, or a row written behind the router's back
        that a change now collides with) would otherwise block every commit after it. Each
        event's changes are tried alone; those refused again are dropped, logged, and their
        creations refused, so the writer goes on with the rest.
        """
        parts: list[tuple[list[Change], _Group | None]] = [(g.changes, g) for g in groups]
        if behind:
            parts.append((behind, None))
        for index, (changes, group) in enumerate(parts):
            try:
                refusals = await self._write(changes)
            except StoreUnavailable as exc:
                rest = [g for _, g in parts[index:] if g is not None]
                self._failed(rest, behind if parts[-1][1] is None else [], exc)
                raise
            except Exception as exc:
                self._drop(changes, group, exc)
                continue
            self._done([group] if group is not None else [], [] if group else changes, refusals)

    def _drop(self, changes: list[Change], group: _Group | None, exc: Exception) -> None:
        """Give up changes the store refuses for good; refuse the requests they would create."""
        states = [change for change in changes if isinstance(change, StateChange)]
        _log.error(
            "changes_dropped",
            request_ids=sorted({change.request.id for change in states}),
            error=repr(exc),
        )
        self._pending -= len(changes)
        if not (self._groups or self._behind):
            self._idle.set()
        if group is not None and not group.done.done():
            group.done.set_result(None)
        created = {change.request.id for change in states if change.created}
        if created:
            self._on_refused(created, StoreUnavailable(f"the state store refused it: {exc!r}"))
            self._purge(created)

    def _failed(
        self, groups: list[_Group], behind: list[Change], failure: StoreUnavailable
    ) -> None:
        """After a failed commit: refuse the creations it held, keep the rest for the next try."""
        self._failure = failure
        refused = {
            change.request.id
            for group in groups
            for change in group.changes
            if isinstance(change, StateChange) and change.created
        }
        kept: list[_Group] = []
        for group in groups:
            changes = [
                change
                for change in group.changes
                if not (isinstance(change, StateChange) and change.request.id in refused)
            ]
            self._pending -= len(group.changes) - len(changes)
            if changes:
                group.changes = changes
                kept.append(group)
            elif not group.done.done():
                group.done.set_result(None)
        self._groups = kept + self._groups
        if behind:
            self._behind = behind + self._behind
            self._behind_since = asyncio.get_running_loop().time()
        if not (self._groups or self._behind):
            self._idle.set()
        if refused:
            _log.warning("requests_refused", count=len(refused), error=failure.message)
            self._on_refused(refused, failure)
            self._purge(refused)


def _without(changes: list[Change], request_ids: set[str]) -> list[Change]:
    """``changes`` less those of the requests ``request_ids``."""
    return [
        change
        for change in changes
        if not (isinstance(change, StateChange) and change.request.id in request_ids)
    ]

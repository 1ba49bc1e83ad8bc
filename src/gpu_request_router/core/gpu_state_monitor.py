"""The live GPU inventory: readings merged with router reservations, health, cordon and drain.

No I/O: monitoring sources (``services/gpu_monitoring.py``) read GPUs and hand the readings in.

**Room for placement** on a GPU is ``total − safety margin − router reservations − memory used by
others``, where *memory used by others* is the reading's used memory minus what the reporting
worker attributes to the router's executions. A source that cannot attribute memory (plain NVML,
dcgm-exporter) reports everything as used by others, which double-counts the router's own running
work: placement is then conservative, never over-committed (SPEC §2 I2).

**Health**, per GPU, from the latest reading: the source's own verdict; uncorrected ECC errors make
it ``unhealthy``; a temperature at or above ``max_temperature_c`` makes it ``degraded`` (still used,
placed on last). Per worker, over time: no reading for ``stale_after_s`` makes its GPUs
``unknown``; failing to answer for ``stale_after_s`` makes them ``unhealthy``; a GPU missing from
its worker's complete report is ``unhealthy``. Only ``healthy`` and ``degraded`` GPUs that are not
cordoned and whose circuit is closed are schedulable. Work on a GPU that turns ``unhealthy`` is
lost; work on an ``unknown`` one may still finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpu_request_router.core.placement_index import PlacementIndex
from gpu_request_router.exceptions import NotFound
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading, GPUState

__all__ = ["GPUStateMonitor"]

_USABLE = (GPUHealth.HEALTHY, GPUHealth.DEGRADED)


@dataclass(slots=True)
class _Worker:
    """When a worker last reported, and since when its reports have been failing."""

    last_reading: float
    failing_since: float | None = None
    lost: bool = False


def _make_up(reading: GPUReading) -> tuple[object, ...]:
    """What a reading says about the fleet's make-up rather than its load."""
    return reading.type, reading.memory_total_mb, reading.models, reading.models_loaded


class GPUStateMonitor:
    """Holds every known GPU's state and decides its health and room for placement.

    Example::

        monitor = GPUStateMonitor(stale_after_s=10, safety_margin_mb=1024)
        monitor.apply(readings, now, worker="node-a")
        monitor.reserve("node-a:0", "exe_1", 20_000)
    """

    def __init__(
        self,
        *,
        stale_after_s: float,
        safety_margin_mb: int,
        max_temperature_c: float = 90.0,
    ) -> None:
        self._stale_after_s = stale_after_s
        self._margin = safety_margin_mb
        self._max_temperature = max_temperature_c
        self._gpus: dict[str, GPUState] = {}
        self._workers: dict[str, _Worker] = {}
        self._by_worker: dict[str, list[GPUState]] = {}
        self._index = PlacementIndex()
        self._holders: dict[str, list[str]] = {}
        self._fleet_version = 0
        self._seq = 0  # placements and releases, numbered (see mark)
        self._aside: set[str] = set()  # GPUs with memory set aside (set_aside)

    # Views ---------------------------------------------------------------------------------------

    @property
    def gpus(self) -> Mapping[str, GPUState]:
        """Every known GPU by id."""
        return self._gpus

    @property
    def schedulable(self) -> Mapping[str, GPUState]:
        """The GPUs that may take new work now, by id, in the order they became schedulable."""
        return self._index.schedulable

    @property
    def index(self) -> PlacementIndex:
        """The schedulable GPUs indexed for placement, kept current with every change here."""
        return self._index

    @property
    def fleet_version(self) -> int:
        """Changes whenever a GPU joins or its type, total memory or models change.

        What depends only on the fleet's make-up (not on its load) can be kept until then.
        """
        return self._fleet_version

    def get(self, gpu_id: str) -> GPUState:
        """The GPU with this id.

        Raises:
            NotFound: no such GPU is known.
        """
        state = self._gpus.get(gpu_id)
        if state is None:
            raise NotFound("gpu", gpu_id)
        return state

    def on_worker(self, worker: str) -> Sequence[GPUState]:
        """The GPUs of one worker, in index order."""
        return self._by_worker.get(worker, ())

    def limit_mb(self, state: GPUState) -> int:
        """The most this router may reserve on a GPU in all.

        That is the shared limit less what other routers hold there (:meth:`shared_limit_mb`,
        :meth:`elsewhere`).
        """
        return self.shared_limit_mb(state) - state.elsewhere_mb

    def shared_limit_mb(self, state: GPUState) -> int:
        """The most all routers together may reserve on a GPU: total − margin − used by others.

        "Used by others" is what the latest reading showed beyond the router's reservations,
        plus ``hidden_mb`` (see :meth:`release`) until the next reading.
        """
        return (
            state.memory_total_mb - self._margin - state.reading.external_used_mb - state.hidden_mb
        )

    def elsewhere(self, gpu_id: str, memory_mb: int, slots: int) -> bool:
        """Record what other routers sharing the state store hold on a GPU; True if it changed.

        Their reservations come off this router's room and their executions off its free slots
        (a reading that does not attribute their memory to the router counts it twice, which
        errs on the safe side). An unknown GPU is ignored.
        """
        state = self._gpus.get(gpu_id)
        if state is None or (state.elsewhere_mb, state.elsewhere_slots) == (memory_mb, slots):
            return False
        state.elsewhere_mb = memory_mb
        state.elsewhere_slots = slots
        self._recompute(state)
        return True

    # Readings and health -------------------------------------------------------------------------

    def mark(self) -> int:
        """The sequence number of the latest placement or release.

        Take it before reading a source and pass it to :meth:`apply`: the readings then count
        as showing what happened up to it, and nothing after.
        """
        return self._seq

    def apply(
        self,
        readings: Iterable[GPUReading],
        now: float,
        *,
        worker: str | None = None,
        mark: int | None = None,
    ) -> list[str]:
        """Take in readings; with ``worker``, they are that worker's complete report.

        ``mark`` (:meth:`mark` when the reading began; default: now) says which placements and
        releases the readings already show, for readings that do not list their executions.

        Returns the ids of GPUs that became unhealthy (their running work is lost).
        """
        shown = self._seq if mark is None else mark
        lost: list[str] = []
        reported: set[str] = set()
        for reading in readings:
            reported.add(reading.gpu_id)
            self._touch_worker(reading.worker, now)
            state = self._gpus.get(reading.gpu_id)
            if state is None or _make_up(state.reading) != _make_up(reading):
                self._fleet_version += 1
            if state is None:
                state = GPUState(reading=reading, last_seen=now)
                self._gpus[state.id] = state
                self._by_worker.setdefault(state.worker, []).append(state)
                self._by_worker[state.worker].sort(key=lambda gpu: gpu.reading.index)
            was_usable = state.health in _USABLE or state.health is GPUHealth.UNKNOWN
            state.reading = reading
            state.last_seen = now
            self._settle(state, reading, shown)
            state.health = self._health_of(reading)
            if was_usable and state.health is GPUHealth.UNHEALTHY:
                lost.append(state.id)
            self._recompute(state)
        if worker is not None:
            self._touch_worker(worker, now)
            for state in self._by_worker.get(worker, ()):
                if state.id not in reported and state.health is not GPUHealth.UNHEALTHY:
                    state.health = GPUHealth.UNHEALTHY
                    lost.append(state.id)
                    self._recompute(state)
        return lost

    @staticmethod
    def _settle(state: GPUState, reading: GPUReading, shown: int) -> None:
        """Forget what ``reading`` shows: placements it saw, releases it no longer nets.

        A reading that lists its executions says exactly which; otherwise it shows everything
        up to the mark ``shown``.
        """
        listed = reading.running
        if state.unseen:
            if listed is None:
                state.unseen = {h: seq for h, seq in state.unseen.items() if seq > shown}
            else:
                state.unseen = {h: seq for h, seq in state.unseen.items() if h not in listed}
        if state.hidden:
            if listed is None:
                state.hidden = [entry for entry in state.hidden if entry[0] > shown]
            else:
                state.hidden = [entry for entry in state.hidden if entry[2] in listed]
            state.hidden_mb = sum(entry[1] for entry in state.hidden)

    def source_failed(self, worker: str, now: float) -> None:
        """Note that reading ``worker`` failed; silent for ``stale_after_s`` makes it unhealthy."""
        record = self._workers.setdefault(worker, _Worker(last_reading=now))
        if record.failing_since is None:
            record.failing_since = now

    def refresh(self, now: float) -> list[str]:
        """Apply the passing of time (staleness, silent workers); return GPUs that became lost."""
        lost: list[str] = []
        for name, record in self._workers.items():
            silent = record.failing_since is not None and (
                now - record.failing_since >= self._stale_after_s
            )
            stale = now - record.last_reading >= self._stale_after_s
            for state in self._by_worker.get(name, ()):
                if silent and state.health is not GPUHealth.UNHEALTHY:
                    state.health = GPUHealth.UNHEALTHY
                    lost.append(state.id)
                elif stale and state.health in _USABLE:
                    state.health = GPUHealth.UNKNOWN
                else:
                    continue
                self._recompute(state)
        return lost

    def next_change(self) -> float | None:
        """The earliest time :meth:`refresh` could change a GPU's health, or ``None``."""
        times = []
        for name, record in self._workers.items():
            states = self._by_worker.get(name, ())
            if any(state.health in _USABLE for state in states):
                times.append(record.last_reading + self._stale_after_s)
            if record.failing_since is not None and any(
                state.health is not GPUHealth.UNHEALTHY for state in states
            ):
                times.append(record.failing_since + self._stale_after_s)
        return min(times, default=None)

    def _touch_worker(self, worker: str, now: float) -> None:
        record = self._workers.get(worker)
        if record is None:
            self._workers[worker] = _Worker(last_reading=now)
        else:
            record.last_reading = now
            record.failing_since = None

    def _health_of(self, reading: GPUReading) -> GPUHealth:
        if reading.health is GPUHealth.UNHEALTHY or reading.ecc_uncorrected > 0:
            return GPUHealth.UNHEALTHY
        hot = reading.temperature_c is not None and reading.temperature_c >= self._max_temperature
        if hot and reading.health is GPUHealth.HEALTHY:
            return GPUHealth.DEGRADED
        return reading.health

    # Operator actions ----------------------------------------------------------------------------

    def cordon(self, gpu_id: str) -> GPUState:
        """Stop placing new work on a GPU (running work continues)."""
        state = self.get(gpu_id)
        state.cordoned = True
        self._recompute(state)
        return state

    def uncordon(self, gpu_id: str) -> GPUState:
        """Resume placing work on a GPU (also ends a drain)."""
        state = self.get(gpu_id)
        state.cordoned = False
        state.draining = False
        self._recompute(state)
        return state

    def drain(self, gpu_id: str) -> GPUState:
        """Cordon a GPU and mark it draining until its running work has finished."""
        state = self.cordon(gpu_id)
        state.draining = bool(state.running)
        return state

    def set_circuit(self, gpu_id: str, is_open: bool) -> None:
        """Record whether the GPU's circuit breaker is open (open: no new work)."""
        state = self._gpus.get(gpu_id)
        if state is not None and state.circuit_open != is_open:
            state.circuit_open = is_open
            self._recompute(state)

    # Reservations --------------------------------------------------------------------------------

    def reserve(self, gpu_id: str, holder: str, memory_mb: int) -> bool:
        """Reserve memory and a slot on a GPU for execution ``holder``; False if it does not fit."""
        state = self.get(gpu_id)
        if state.free_slots <= 0:
            return False
        if memory_mb < 0:
            raise ValueError("a reservation cannot be negative")
        total = state.reserved_mb - state.running.get(holder, 0) + memory_mb
        if total > self.limit_mb(state):
            return False
        state.reserved_mb = total
        state.running[holder] = memory_mb
        self._seq += 1
        state.unseen[holder] = self._seq
        self._holders.setdefault(holder, []).append(gpu_id)
        self._recompute(state)
        return True

    def adopt(self, gpu_id: str, holder: str, memory_mb: int) -> None:
        """Record the reservation of execution ``holder``, which already runs on a GPU.

        For an execution re-attached after a restart: it holds its memory and its slot whatever
        the room, so this is never refused. Readings taken since the restart saw it already.
        """
        state = self.get(gpu_id)
        state.reserved_mb += memory_mb - state.running.get(holder, 0)
        state.running[holder] = memory_mb
        self._holders.setdefault(holder, []).append(gpu_id)
        self._recompute(state)

    def set_aside(self, gpu_id: str, memory_mb: int) -> None:
        """Keep ``memory_mb`` and a slot of a GPU from placement until :meth:`clear_aside`.

        A pass keeps them for a better-ranked request of another router that would go there;
        nothing is reserved, and no reading is asked to show it.
        """
        state = self.get(gpu_id)
        state.aside_mb += memory_mb
        state.aside_slots += 1
        self._aside.add(gpu_id)
        self._recompute(state)

    def clear_aside(self) -> None:
        """Give back what :meth:`set_aside` kept."""
        for gpu_id in self._aside:
            state = self._gpus[gpu_id]
            state.aside_mb = state.aside_slots = 0
            self._recompute(state)
        self._aside.clear()

    def release(
        self,
        holder: str,
        peak_mb: int | None = None,
        size_mb: int | None = None,
        *,
        out_of_memory: bool = False,
        model: str = "",
        weights_mb: int = 0,
    ) -> list[str]:
        """Release every reservation of execution ``holder``; return the GPUs it was on.

        ``peak_mb``: the most memory it used on one GPU, weights included, where the backend
        reported it; ``size_mb``: the request's full size per GPU, weights included (what it
        reserves where its model is not loaded). A reading nets what the router's executions
        use beyond their reservations against what they leave unused, so when an execution the
        latest reading saw ends having used less than it reserved, the others' excess that it
        hid comes to light: ``size_mb − peak_mb`` (at most its reservation) counts as used by
        others (``hidden_mb``) until a reading taken after the release shows the truth. It is
        a lower bound: the peak is the most an execution used, not what the reading saw.

        ``out_of_memory``: the execution failed for want of memory: a GPU of it had less free
        than it needed, and it needed at least ``peak_mb`` beyond the weights already resident
        there (its reservation where no peak is known). Until a reading taken after the failure
        shows the truth, each of its GPUs' room is cut to ``needed − margin − 1`` (the rest
        counts as ``hidden_mb``): a view that let one allocation fail would otherwise let the
        next ones placed there fail too. The cut errs on the safe side — the need may have been
        larger than the peak, and which GPU of a multi-GPU execution failed is not reported —
        and lasts one reading.

        ``model`` and ``weights_mb`` (its per-GPU weights, within ``size_mb``): an execution that
        reserved its weights (its model was not loaded there) on a GPU whose latest reading
        lists the model as loaded leaves the weights behind, in use by another execution of
        the model, so they count as used (``hidden_mb``) until a reading taken after the
        release. Where the reading listed them because of this execution alone, the backend
        has moved them to its cache (``models_cached``) and the next reading shows them free:
        the hold errs on the safe side for one reading.
        """
        gpu_ids = self._holders.pop(holder, [])
        if not gpu_ids:
            return []
        self._seq += 1
        for gpu_id in gpu_ids:
            state = self._gpus[gpu_id]
            reserved = state.running.pop(holder, 0)
            seen = state.unseen.pop(holder, None) is None
            size = size_mb if size_mb is not None else reserved
            state.reserved_mb -= reserved
            if out_of_memory:
                needed = reserved if peak_mb is None else peak_mb - (size - reserved)
                room = self.limit_mb(state) - state.reserved_mb
                self._hide(state, room - max(0, needed - self._margin - 1), holder)
            else:
                hidden = 0
                if seen and peak_mb is not None:
                    hidden = min(reserved, size - peak_mb)
                if weights_mb and reserved == size and model in state.reading.models_loaded:
                    hidden = max(0, hidden) + min(weights_mb, reserved)
                self._hide(state, hidden, holder)
            if state.draining and not state.running:
                state.draining = False
            self._recompute(state)
        return gpu_ids

    def _hide(self, state: GPUState, memory_mb: int, holder: str) -> None:
        """Count ``memory_mb`` more as used on ``state`` until a later reading (see release)."""
        if memory_mb > 0:
            state.hidden.append((self._seq, memory_mb, holder))
            state.hidden_mb += memory_mb

    def unhealthy_with_work(self) -> list[str]:
        """Unhealthy GPUs that still hold reservations (work to fail over)."""
        return [
            gpu_id
            for gpu_id, state in self._gpus.items()
            if state.health is GPUHealth.UNHEALTHY and state.running
        ]

    def holders_on(self, gpu_id: str) -> list[str]:
        """The executions holding reservations on a GPU."""
        return list(self.get(gpu_id).running)

    def _recompute(self, state: GPUState) -> None:
        """Refresh the derived placement attributes of one GPU, and its place in the index.

        Every change to a GPU's reading, health, cordon, circuit or reservations ends here.
        """
        state.room_mb = self.limit_mb(state) - state.reserved_mb - state.aside_mb
        state.free_slots = (
            state.slots - len(state.running) - state.elsewhere_slots - state.aside_slots
        )
        state.busy = max(1.0 - state.free_slots / max(state.slots, 1), state.reading.load or 0.0)
        state.schedulable = (
            state.health in _USABLE and not state.cordoned and not state.circuit_open
        )
        self._index.update(state)

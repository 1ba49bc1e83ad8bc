"""The in-process ledger of GPU memory reservations that the memory and SQLite stores share."""

from __future__ import annotations

import threading

__all__ = ["ReservationLedger"]


class ReservationLedger:
    """Reservations per GPU and holder, with an atomic check-and-add against a limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reserved: dict[str, dict[str, int]] = {}
        self._held: dict[str, set[str]] = {}

    def reserve(self, gpu_id: str, holder: str, memory_mb: int, limit_mb: int) -> int | None:
        """Reserve memory on a GPU unless the total would pass ``limit_mb``; the new total."""
        if memory_mb < 0:
            raise ValueError("a reservation cannot be negative")
        with self._lock:
            on_gpu = self._reserved.setdefault(gpu_id, {})
            total = sum(on_gpu.values()) - on_gpu.get(holder, 0) + memory_mb
            if total > limit_mb:
                return None
            on_gpu[holder] = memory_mb
            self._held.setdefault(holder, set()).add(gpu_id)
            return total

    def release(self, holder: str) -> dict[str, int]:
        """Drop every reservation of ``holder``; return each touched GPU's new reserved total."""
        with self._lock:
            totals = {}
            for gpu_id in self._held.pop(holder, ()):
                on_gpu = self._reserved[gpu_id]
                on_gpu.pop(holder, None)
                totals[gpu_id] = sum(on_gpu.values())
            return totals

    def reserved_mb(self, gpu_id: str) -> int:
        """The memory reserved on a GPU right now."""
        with self._lock:
            return sum(self._reserved.get(gpu_id, {}).values())

"""State stores: where requests, their audit trail, reservations and quota counters are kept."""

from gpu_request_router.config.config_loader import StateSettings
from gpu_request_router.core.state_store import Page, RequestQuery, StateStore
from gpu_request_router.exceptions import ConfigError
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.store.sqlite import SQLiteStore

__all__ = ["MemoryStore", "Page", "RequestQuery", "SQLiteStore", "StateStore", "open_store"]


def open_store(settings: StateSettings) -> StateStore:
    """The store ``settings`` names (``state.backend``).

    Raises:
        ConfigError: the backend is not available in this version.
    """
    if settings.backend == "memory":
        return MemoryStore()
    if settings.backend == "sqlite":
        return SQLiteStore(settings.sqlite_path, synchronous=settings.sqlite_synchronous)
    raise ConfigError("state.backend", f"{settings.backend!r} is not available in this version")

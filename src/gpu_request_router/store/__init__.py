"""State stores: where requests, their audit trail, reservations and quota counters are kept."""

from gpu_request_router.config.config_loader import StateSettings
from gpu_request_router.core.state_store import Page, RequestQuery, StateStore
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.store.redis_store import RedisStore
from gpu_request_router.store.sqlite import SQLiteStore

__all__ = [
    "MemoryStore",
    "Page",
    "RedisStore",
    "RequestQuery",
    "SQLiteStore",
    "StateStore",
    "open_store",
]


def open_store(settings: StateSettings) -> StateStore:
    """The store ``settings`` names (``state.backend``).

    Raises:
        StoreInUse: another router owns the SQLite file or the Redis prefix.
        StoreUnavailable: the store cannot be opened (see each store).
    """
    retention_s = settings.retention_s
    if settings.backend == "memory":
        return MemoryStore(retention_s=retention_s)
    if settings.backend == "sqlite":
        return SQLiteStore(
            settings.sqlite_path,
            synchronous=settings.sqlite_synchronous,
            retention_s=retention_s,
        )
    return RedisStore(
        settings.redis_url,
        prefix=settings.redis_prefix,
        retention_s=retention_s,
        standby=settings.standby,
        lease_s=settings.redis_lease_s,
        shared=settings.shared,
    )

"""State stores: where requests, reservations and quota counters are kept."""

from gpu_request_router.store.base import Page, RequestQuery, StateStore
from gpu_request_router.store.memory import MemoryStore

__all__ = ["MemoryStore", "Page", "RequestQuery", "StateStore"]

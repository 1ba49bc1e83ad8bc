"""Configuration: the typed settings tree and its loader."""

from gpu_request_router.config.config_loader import (
    POLICIES,
    BackendSettings,
    ModelSpec,
    Settings,
    load_settings,
)

__all__ = ["POLICIES", "BackendSettings", "ModelSpec", "Settings", "load_settings"]

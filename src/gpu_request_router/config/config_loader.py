"""Typed settings: packaged defaults, then a user YAML file, then ``GPUROUTER_*`` variables.

Sources apply in this order, later ones winning (SPEC §7):

1. ``config/default_config.yaml`` shipped inside the package (every default, documented inline);
2. the user's file (``--config``): mappings merge key by key, lists replace;
3. environment variables ``GPUROUTER_<SECTION>__<KEY>[__<KEY>...]``, e.g.
   ``GPUROUTER_PLACEMENT__POLICY=best_fit`` or ``GPUROUTER_QUOTAS__DEFAULT__MAX_CONCURRENT=4``
   (lists and mappings as JSON, ``null`` for unlimited).

Invalid configuration fails at load time with :class:`~gpu_request_router.exceptions.ConfigError`
naming the dotted key. Example::

    settings = load_settings("examples/config.yaml")
    settings.placement.policy  # "balanced"
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from gpu_request_router.exceptions import ConfigError
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.models.request import Task
from gpu_request_router.models.user_quota import UserQuota

__all__ = [
    "POLICIES",
    "Architecture",
    "AuthSettings",
    "BackendSettings",
    "CircuitBreakerSettings",
    "GpuGroup",
    "LoggingSettings",
    "ModelSpec",
    "MonitorSettings",
    "PlacementSettings",
    "PrioritySettings",
    "QuotaLimits",
    "QuotaSettings",
    "RetrySettings",
    "ServerSettings",
    "Settings",
    "StateSettings",
    "Throughput",
    "UserEntry",
    "WorkerSettings",
    "load_settings",
]

POLICIES = ("balanced", "best_fit", "least_loaded", "power_of_two", "round_robin", "random")
PolicyName = Literal[
    "balanced", "best_fit", "least_loaded", "power_of_two", "round_robin", "random"
]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")


class _Section(BaseModel):
    """A settings section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """The HTTP server and request-level limits."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    metrics_require_auth: bool = False
    default_timeout_s: float = Field(3600.0, gt=0)
    max_timeout_s: float = Field(86400.0, gt=0)
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)

    @model_validator(mode="after")
    def _timeouts(self) -> Self:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s must not exceed max_timeout_s")
        return self


class UserEntry(_Section):
    """A user who may call the router, with the SHA-256 hash (hex) of their API key."""

    name: str = Field(pattern=_NAME)
    role: Literal["admin", "user"] = "user"
    api_key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuthSettings(_Section):
    """Authentication: the users, their roles and their key hashes."""

    enabled: bool = True
    users: list[UserEntry] = Field(default_factory=list)
    max_failures_per_minute: int = Field(10, ge=1)
    worker_token: str | None = Field(None, min_length=16, max_length=256)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        names = [user.name for user in self.users]
        if len(names) != len(set(names)):
            raise ValueError("user names must be unique")
        hashes = [user.api_key_sha256 for user in self.users]
        if len(hashes) != len(set(hashes)):
            raise ValueError("two users share one API key")
        return self


class StateSettings(_Section):
    """Where the router keeps its state."""

    backend: Literal["sqlite", "memory", "redis"] = "sqlite"
    sqlite_path: str = "./gpurouter.db"
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("gpurouter", pattern=r"^[A-Za-z0-9_.{}-]{1,64}$")
    retention_days: float | None = Field(None, gt=0)
    standby: bool = False
    redis_lease_s: float = Field(5.0, ge=1.0, le=300.0)
    shared: bool = False

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        if self.shared and self.backend != "redis":
            raise ValueError(
                f"shared: routers share state on Redis only (backend: redis), not {self.backend}"
            )
        if self.shared and self.standby:
            raise ValueError(
                "shared and standby exclude each other: routers sharing a prefix all serve and "
                "adopt the work of any that dies; a standby waits for a prefix's one owner"
            )
        return self

    @property
    def retention_s(self) -> float | None:
        """How long finished requests are kept, in seconds (``None``: for ever)."""
        return None if self.retention_days is None else self.retention_days * 86_400.0


class PrioritySettings(_Section):
    """Priority classes (highest first), the default class and aging."""

    classes: list[str] = Field(
        default_factory=lambda: ["critical", "high", "normal", "low", "batch"], min_length=1
    )
    default: str = "normal"
    aging_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("priority classes must be unique")
        for name in self.classes:
            if not re.match(_NAME, name):
                raise ValueError(f"invalid priority class name {name!r}")
        if self.default not in self.classes:
            raise ValueError(f"default {self.default!r} is not one of the classes")
        return self


class QuotaLimits(_Section):
    """The limits every user gets unless overridden; ``null`` means unlimited."""

    requests_per_minute: int | None = Field(600, ge=1)
    max_concurrent: int | None = Field(16, ge=1)
    max_queued: int | None = Field(1000, ge=1)
    gpu_seconds_per_hour: float | None = Field(36000.0, gt=0)
    max_priority: str = "high"
    max_gpu_memory_mb: int | None = Field(None, ge=1)


class QuotaOverride(_Section):
    """Per-user overrides; a key that is absent inherits the default, ``null`` means unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    max_queued: int | None = Field(None, ge=1)
    gpu_seconds_per_hour: float | None = Field(None, gt=0)
    max_priority: str | None = None
    max_gpu_memory_mb: int | None = Field(None, ge=1)


class QuotaSettings(_Section):
    """Quota defaults, per-user overrides, and the bound on what waits in the router as a whole.

    ``max_queued_total`` bounds the requests waiting in the router (queued, or backing off to be
    retried) across all users; a submission beyond it is refused until one leaves the queue.
    ``null`` removes the bound, and with it any bound on the memory the queue takes.
    """

    default: QuotaLimits = Field(default_factory=QuotaLimits)
    users: dict[str, QuotaOverride] = Field(default_factory=dict)
    max_queued_total: int | None = Field(10_000, ge=1)

    def for_user(self, user: str) -> UserQuota:
        """The effective quota of ``user``: the defaults with their overrides applied."""
        merged = self.default.model_dump()
        override = self.users.get(user)
        if override is not None:
            merged.update({key: getattr(override, key) for key in override.model_fields_set})
        return UserQuota(user=user, **merged)


class Throughput(_Section):
    """Measured speed of a model on one GPU type."""

    prefill_tokens_per_s: float = Field(gt=0)
    decode_tokens_per_s: float = Field(gt=0)


class Architecture(_Section):
    """The Hugging Face ``config.json`` fields a model's memory is derived from."""

    num_hidden_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=1)
    vocab_size: int = Field(ge=1)
    dtype: Literal["float32", "float16", "bfloat16", "float8", "int8"] = "bfloat16"
    tie_word_embeddings: bool = False
    # Not config.json fields: the family of the model and the attention kernel it is served with
    # (the names of Hugging Face's attn_implementation; sdpa and flash_attention_2 never hold
    # the score matrix, eager does).
    kind: Literal["decoder", "encoder"] = "decoder"
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    # Encoders only (BERT family): learned position and token-type embeddings.
    max_position_embeddings: int = Field(0, ge=0)
    type_vocab_size: int = Field(0, ge=0)


class ModelSpec(_Section):
    """One model of the catalog: its size figures, or an architecture to derive them from."""

    task: Task = Task.CHAT
    weights_mb: int | None = Field(None, ge=0)
    kv_bytes_per_token: int | None = Field(None, ge=0)
    activation_bytes_per_token: int | None = Field(None, ge=0)
    max_context: int = Field(4096, ge=1)
    max_output_tokens: int = Field(256, ge=1)
    default_duration_s: float = Field(1.0, gt=0)
    throughput: dict[str, Throughput] = Field(default_factory=dict)
    architecture: Architecture | None = None

    @model_validator(mode="after")
    def _sized(self) -> Self:
        if self.weights_mb is None and self.architecture is None:
            raise ValueError("give weights_mb or an architecture block")
        return self


class ServiceSettings(_Section):
    """How GPUs serve work (core/service_model.py): sharing slowdowns and load bandwidth."""

    batch_slowdown: float = Field(0.03, ge=0)
    job_slowdown: float = Field(1.0, ge=0)
    load_gb_s: float = Field(1.7, gt=0)


class PlacementSettings(_Section):
    """The placement policy and the knobs of the dispatch loop."""

    policy: PolicyName = "balanced"
    memory_safety_margin_mb: int = Field(1024, ge=0)
    backfill_depth: int = Field(256, ge=1)
    starvation_bound_s: float = Field(2.0, gt=0)
    seed: int = 0
    service: ServiceSettings = Field(default_factory=ServiceSettings)


class GpuGroup(_Section):
    """A group of identical simulated GPUs."""

    type: str = Field(pattern=_NAME)
    count: int = Field(1, ge=1, le=4096)
    memory_mb: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _known(self) -> Self:
        if self.memory_mb is None and self.type not in BUILTIN_GPU_TYPES:
            known = ", ".join(BUILTIN_GPU_TYPES)
            raise ValueError(f"unknown GPU type {self.type!r}: give memory_mb (built in: {known})")
        return self


class BackendSettings(_Section):
    """A backend: an in-process simulated fleet, a worker agent, or an OpenAI-compatible server."""

    name: str = Field(pattern=_NAME)
    kind: Literal["simulated", "agent", "openai"]
    url: str | None = None
    gpus: list[GpuGroup] = Field(default_factory=list)
    gpu: GpuGroup | None = None
    slots_per_gpu: int = Field(8, ge=1, le=1024)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    models_loaded: list[str] = Field(default_factory=list)
    service: Literal["fixed", "shared"] = "fixed"
    dcgm_url: str | None = Field(None, pattern=r"^https?://")
    dcgm_gpu: int = Field(0, ge=0)
    metrics_url: str | None = Field(None, pattern=r"^https?://")

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.kind == "simulated" and not self.gpus:
            raise ValueError("a simulated backend needs gpus")
        if self.kind in ("agent", "openai") and not self.url:
            raise ValueError(f"a backend of kind {self.kind} needs a url")
        if self.kind == "openai" and self.gpu is None:
            raise ValueError("an openai backend needs gpu: {type, memory_mb}")
        if self.kind != "simulated" and self.service != "fixed":
            raise ValueError("service belongs to simulated backends")
        if self.kind != "openai" and (self.dcgm_url or self.metrics_url):
            raise ValueError("dcgm_url and metrics_url belong to openai backends")
        return self


_SIMULATE = r"^[0-9]{1,4}x[A-Za-z0-9._-]+(,[0-9]{1,4}x[A-Za-z0-9._-]+)*$"


class WorkerSettings(_Section):
    """The worker agent (``gpurouter worker``) on a GPU host."""

    name: str | None = Field(None, pattern=_NAME)
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=1, le=65535)
    slots: int = Field(8, ge=1, le=1024)
    simulate: str | None = Field(None, pattern=_SIMULATE)
    simulate_service: Literal["fixed", "shared"] = "fixed"
    executor: Literal["simulated", "callable", "openai"] = "simulated"
    callable: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    openai_url: str | None = Field(None, pattern=r"^https?://")
    router_url: str | None = Field(None, pattern=r"^https?://")
    advertise_url: str | None = Field(None, pattern=r"^https?://")
    heartbeat_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.executor == "callable" and not self.callable:
            raise ValueError("executor callable needs callable: module:function")
        if self.executor == "openai" and not self.openai_url:
            raise ValueError("executor openai needs openai_url")
        return self


class MonitorSettings(_Section):
    """GPU monitoring: how often to read, when a reading is stale, health thresholds."""

    poll_interval_s: float = Field(1.0, gt=0)
    stale_after_s: float = Field(10.0, gt=0)
    max_temperature_c: float = Field(90.0, gt=0)


class CircuitBreakerSettings(_Section):
    """Per-backend and per-GPU circuit breaker."""

    failure_threshold: int = Field(5, ge=1)
    reset_s: float = Field(30.0, gt=0)


class RetrySettings(_Section):
    """Retries: attempts per request, capped exponential backoff, the retry budget, OOM growth."""

    max_attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    budget_ratio: float = Field(0.2, ge=0, le=10)
    budget_min: int = Field(3, ge=0)
    budget_window_s: float = Field(10.0, gt=0)
    oom_growth: float = Field(1.5, gt=1)
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)


class LoggingSettings(_Section):
    """Log level and format; OpenTelemetry trace export."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    otlp_endpoint: str | None = Field(None, pattern=r"^https?://")
    service_name: str = Field("gpu-request-router", min_length=1, max_length=128)


class Settings(BaseSettings):
    """The whole configuration of a router, one typed tree (SPEC §7).

    Build it with :func:`load_settings`; constructing it directly applies the environment on top
    of the keyword arguments but not the packaged defaults file.
    """

    model_config = SettingsConfigDict(
        env_prefix="GPUROUTER_",
        env_nested_delimiter="__",
        env_parse_none_str="null",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    priorities: PrioritySettings = Field(default_factory=PrioritySettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    backends: list[BackendSettings] = Field(default_factory=list)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment variables win over the (YAML) values passed in."""
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        classes = self.priorities.classes
        if self.quotas.default.max_priority not in classes:
            raise ValueError(
                f"quotas.default.max_priority: {self.quotas.default.max_priority!r} "
                f"is not a priority class ({', '.join(classes)})"
            )
        for user, override in self.quotas.users.items():
            if override.max_priority is not None and override.max_priority not in classes:
                raise ValueError(
                    f"quotas.users.{user}.max_priority: {override.max_priority!r} "
                    f"is not a priority class ({', '.join(classes)})"
                )
        for name in self.models:
            if not _MODEL_NAME.match(name):
                raise ValueError(f"models.{name}: invalid model name")
        names = [backend.name for backend in self.backends]
        if len(names) != len(set(names)):
            raise ValueError("backends: names must be unique")
        return self

    def priority_rank(self, priority: str) -> int:
        """The rank of a class: 0 for the highest."""
        return self.priorities.classes.index(priority)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: mappings key by key, everything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(origin, f"not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(origin, "the top level must be a mapping of sections")
    return data


def default_config_text() -> str:
    """The packaged ``default_config.yaml``, every default documented inline."""
    return resources.files("gpu_request_router.config").joinpath("default_config.yaml").read_text()


def _error_key(error: Any) -> str:
    parts = [str(part) for part in error["loc"]]
    return ".".join(parts) if parts else "config"


def load_settings(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load the configuration: packaged defaults, the file at ``path``, ``overrides``, then env.

    Raises:
        ConfigError: the file is missing or malformed, or a value is invalid; ``key`` names it.
    """
    data = _read_yaml(default_config_text(), "default_config.yaml")
    if path is not None:
        file = Path(path)
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(str(file), f"cannot read the config file: {exc.strerror}") from exc
        data = _deep_merge(data, _read_yaml(text, str(file)))
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Settings(**data)
    except SettingsError as exc:
        # An environment value that should be JSON (a list, a mapping) but is not.
        found = re.search(r'field "([^"]+)"', str(exc))
        key = found.group(1) if found else "config"
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise ConfigError(
            key, f"cannot parse the GPUROUTER_{key.upper()}* environment variable{cause}"
        ) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        key = _error_key(first)
        if key == "config" and ": " in message:
            key, message = message.split(": ", 1)
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more error{'s' if more > 1 else ''})"
        raise ConfigError(key, message) from exc

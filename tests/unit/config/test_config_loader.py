"""Tests of the config loader: packaged defaults, user files, environment overrides, errors."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gpu_request_router.config.config_loader import (
    AuthSettings,
    CircuitBreakerSettings,
    LoggingSettings,
    MonitorSettings,
    PlacementSettings,
    PrioritySettings,
    QuotaLimits,
    QuotaSettings,
    RetrySettings,
    ServerSettings,
    Settings,
    StateSettings,
    default_config_text,
    load_settings,
)
from gpu_request_router.exceptions import ConfigError
from gpu_request_router.models.user_quota import UserQuota
from gpu_request_router.store import MemoryStore, open_store

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "config.yaml"

SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerSettings,
    "auth": AuthSettings,
    "state": StateSettings,
    "priorities": PrioritySettings,
    "quotas": QuotaSettings,
    "placement": PlacementSettings,
    "monitor": MonitorSettings,
    "retries": RetrySettings,
    "logging": LoggingSettings,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPUROUTER_* variable of the surrounding shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("GPUROUTER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """Write a YAML file (dedented) under ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path | None = None, **overrides: Any) -> ConfigError:
    """The ConfigError raised by loading ``path`` with ``overrides``."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, overrides=overrides or None)
    return info.value


# --- packaged defaults and the example -----------------------------------------------------


def test_packaged_defaults_load() -> None:
    """The packaged defaults load into the documented values."""
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings.placement.policy == "balanced"
    assert settings.placement.memory_safety_margin_mb == 1024
    assert settings.state.backend == "sqlite"
    assert settings.priorities.classes == ["critical", "high", "normal", "low", "batch"]
    assert settings.quotas.default.max_gpu_memory_mb is None
    assert set(settings.models) == {
        "llama-3-8b",
        "qwen2.5-7b",
        "tinyllama-1.1b",
        "all-minilm-l6-v2",
    }
    assert [(b.name, b.kind) for b in settings.backends] == [("sim", "simulated")]
    assert [(g.type, g.count) for g in settings.backends[0].gpus] == [("H100-80GB", 4)]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_default_file_agrees_with_the_field_defaults(section: str) -> None:
    """Each section of the default file equals the section built from its field defaults."""
    assert getattr(load_settings(), section) == SECTIONS[section]()


def test_example_config_loads_as_it_is() -> None:
    """The contract example loads unchanged and yields the values it states."""
    settings = load_settings(EXAMPLE)
    assert settings.placement.policy == "balanced"
    assert settings.placement.memory_safety_margin_mb == 1024
    (backend,) = settings.backends
    assert backend.name == "sim"
    assert backend.kind == "simulated"
    assert [(g.type, g.count) for g in backend.gpus] == [("H100-80GB", 2), ("L4-24GB", 2)]
    assert backend.slots_per_gpu == 8
    assert settings.quotas.users["alice"].max_concurrent == 4
    assert settings.quotas.users["admin"].max_priority == "critical"
    assert settings.quotas.default.max_gpu_memory_mb == 81920
    assert [(u.name, u.role) for u in settings.auth.users] == [
        ("admin", "admin"),
        ("alice", "user"),
        ("bob", "user"),
    ]


def test_example_quotas_resolve_per_user() -> None:
    """Alice gets 4 concurrent, admin may ask for critical, bob has the defaults."""
    quotas = load_settings(EXAMPLE).quotas
    assert quotas.for_user("alice").max_concurrent == 4
    assert quotas.for_user("alice").max_priority == "high"
    assert quotas.for_user("admin").max_priority == "critical"
    assert quotas.for_user("admin").max_concurrent == 16
    assert quotas.for_user("bob") == UserQuota(
        user="bob",
        max_priority="high",
        requests_per_minute=600,
        max_concurrent=16,
        max_queued=1000,
        gpu_seconds_per_hour=36000.0,
        max_gpu_memory_mb=81920,
    )


# --- merging a user file ---------------------------------------------------------------------


def test_user_file_merges_mappings_key_by_key(tmp_path: Path) -> None:
    """A key set in the file wins; its siblings keep their defaults."""
    path = write(
        tmp_path,
        """
        placement:
          policy: best_fit
        retries:
          circuit_breaker:
            reset_s: 5
        """,
    )
    settings = load_settings(path)
    assert settings.placement.policy == "best_fit"
    assert settings.placement.memory_safety_margin_mb == 1024
    assert settings.placement.backfill_depth == 256
    assert settings.retries.circuit_breaker == CircuitBreakerSettings(
        failure_threshold=5, reset_s=5.0
    )
    assert settings.retries.max_attempts == 3


def test_user_file_models_add_to_the_catalog(tmp_path: Path) -> None:
    """Models of the file join the packaged catalog (a mapping merges)."""
    path = write(
        tmp_path,
        """
        models:
          my-model:
            weights_mb: 100
          llama-3-8b:
            max_context: 1024
        """,
    )
    models = load_settings(path).models
    assert models["my-model"].weights_mb == 100
    assert models["llama-3-8b"].max_context == 1024
    assert models["llama-3-8b"].weights_mb == 15317
    assert "qwen2.5-7b" in models


def test_user_file_lists_replace(tmp_path: Path) -> None:
    """A list in the file replaces the default list instead of extending it."""
    path = write(
        tmp_path,
        """
        priorities:
          classes: [urgent, normal]
        quotas:
          default:
            max_priority: urgent
        backends:
          - name: small
            kind: simulated
            gpus: [{type: L4-24GB, count: 1}]
        """,
    )
    settings = load_settings(path)
    assert settings.priorities.classes == ["urgent", "normal"]
    assert [b.name for b in settings.backends] == ["small"]
    assert [(g.type, g.count) for g in settings.backends[0].gpus] == [("L4-24GB", 1)]


def test_empty_user_file_gives_the_defaults(tmp_path: Path) -> None:
    """An empty file changes nothing."""
    assert load_settings(write(tmp_path, "")) == load_settings()


def test_overrides_apply_over_the_file(tmp_path: Path) -> None:
    """Programmatic overrides win over the user file, still merging by key."""
    path = write(tmp_path, "placement: {policy: best_fit, seed: 3}\n")
    settings = load_settings(path, overrides={"placement": {"policy": "random"}})
    assert settings.placement.policy == "random"
    assert settings.placement.seed == 3


def test_settings_are_frozen() -> None:
    """A loaded section cannot be changed."""
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.placement.policy = "random"  # type: ignore[misc]


# --- environment ---------------------------------------------------------------------------------


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUROUTER_PLACEMENT__POLICY wins over the policy in the user file."""
    path = write(tmp_path, "placement: {policy: best_fit, seed: 9}\n")
    monkeypatch.setenv("GPUROUTER_PLACEMENT__POLICY", "least_loaded")
    settings = load_settings(path)
    assert settings.placement.policy == "least_loaded"
    assert settings.placement.seed == 9


def test_env_overrides_programmatic_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment wins over overrides passed to load_settings as well."""
    monkeypatch.setenv("GPUROUTER_PLACEMENT__MEMORY_SAFETY_MARGIN_MB", "2048")
    settings = load_settings(overrides={"placement": {"memory_safety_margin_mb": 512}})
    assert settings.placement.memory_safety_margin_mb == 2048


def test_env_overrides_a_nested_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUROUTER_QUOTAS__DEFAULT__MAX_CONCURRENT changes only that key, over the file's value."""
    path = write(tmp_path, "quotas: {default: {max_concurrent: 2, max_queued: 7}}\n")
    monkeypatch.setenv("GPUROUTER_QUOTAS__DEFAULT__MAX_CONCURRENT", "4")
    quotas = load_settings(path).quotas
    assert quotas.default.max_concurrent == 4
    assert quotas.default.max_queued == 7
    assert quotas.default.requests_per_minute == 600


def test_env_overrides_three_levels_deep(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUROUTER_RETRIES__CIRCUIT_BREAKER__RESET_S reaches the nested circuit-breaker section."""
    monkeypatch.setenv("GPUROUTER_RETRIES__CIRCUIT_BREAKER__RESET_S", "7.5")
    retries = load_settings(EXAMPLE).retries
    assert retries.circuit_breaker.reset_s == 7.5
    assert retries.circuit_breaker.failure_threshold == 5


def test_env_sets_a_list_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list-valued key takes JSON from the environment and replaces the list."""
    monkeypatch.setenv(
        "GPUROUTER_BACKENDS",
        '[{"name": "e", "kind": "simulated", "gpus": [{"type": "L4-24GB", "count": 3}]}]',
    )
    (backend,) = load_settings(EXAMPLE).backends
    assert backend.name == "e"
    assert [(g.type, g.count) for g in backend.gpus] == [("L4-24GB", 3)]


def test_env_null_makes_a_quota_unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUROUTER_QUOTAS__DEFAULT__MAX_CONCURRENT=null lifts the limit, as null does in YAML."""
    monkeypatch.setenv("GPUROUTER_QUOTAS__DEFAULT__MAX_CONCURRENT", "null")
    assert load_settings().quotas.default.max_concurrent is None


def test_env_adds_a_user_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-user quota override can come from the environment alone."""
    monkeypatch.setenv("GPUROUTER_QUOTAS__USERS__CAROL__MAX_QUEUED", "3")
    quota = load_settings(EXAMPLE).quotas.for_user("carol")
    assert quota.max_queued == 3
    assert quota.max_concurrent == 16


def test_invalid_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad environment value fails like a bad file value, naming the dotted key."""
    monkeypatch.setenv("GPUROUTER_PLACEMENT__POLICY", "fastest")
    assert config_error().key == "placement.policy"


def test_unparsable_env_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list-valued variable that is not JSON raises ConfigError naming its section."""
    monkeypatch.setenv("GPUROUTER_BACKENDS", "not json")
    assert config_error().key == "backends"


# --- invalid configurations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        pytest.param({"placement": {"policy": "fastest"}}, "placement.policy", id="policy"),
        pytest.param(
            {"placement": {"memory_safety_margin_mb": -1}},
            "placement.memory_safety_margin_mb",
            id="negative-margin",
        ),
        pytest.param({"scheduler": {"policy": "x"}}, "scheduler", id="unknown-section"),
        pytest.param({"placement": {"polcy": "best_fit"}}, "placement.polcy", id="unknown-key"),
        pytest.param(
            {"retries": {"circuit_breaker": {"reset": 3}}},
            "retries.circuit_breaker.reset",
            id="unknown-nested-key",
        ),
        pytest.param(
            {"quotas": {"default": {"max_priority": "ultra"}}},
            "quotas.default.max_priority",
            id="default-max-priority",
        ),
        pytest.param(
            {"quotas": {"users": {"bob": {"max_priority": "ultra"}}}},
            "quotas.users.bob.max_priority",
            id="user-max-priority",
        ),
        pytest.param(
            {"quotas": {"users": {"bob": {"max_concurrent": 0}}}},
            "quotas.users.bob.max_concurrent",
            id="user-max-concurrent",
        ),
        pytest.param({"models": {"m": {"max_context": 10}}}, "models.m", id="model-unsized"),
        pytest.param(
            {"backends": [{"name": "a", "kind": "simulated"}]}, "backends.0", id="sim-no-gpus"
        ),
        pytest.param(
            {"backends": [{"name": "a", "kind": "simulated", "gpus": [{"type": "X9"}]}]},
            "backends.0.gpus.0",
            id="unknown-gpu-type",
        ),
        pytest.param(
            {"backends": [{"name": "a", "kind": "agent"}]}, "backends.0", id="agent-no-url"
        ),
        pytest.param(
            {
                "backends": [
                    {"name": "a", "kind": "simulated", "gpus": [{"type": "L4-24GB"}]},
                    {"name": "a", "kind": "simulated", "gpus": [{"type": "H100-80GB"}]},
                ]
            },
            "backends",
            id="duplicate-backends",
        ),
        pytest.param(
            {"priorities": {"default": "urgent"}}, "priorities", id="default-priority-unknown"
        ),
        pytest.param(
            {"server": {"default_timeout_s": 10, "max_timeout_s": 5}}, "server", id="timeouts"
        ),
        pytest.param(
            {"server": {"trusted_proxies": ["10.0.0.1/8"]}},
            "server.trusted_proxies.0",
            id="trusted-proxy-host-bits",
        ),
        pytest.param(
            {"server": {"trusted_proxies": ["proxy.internal"]}},
            "server.trusted_proxies.0",
            id="trusted-proxy-not-an-address",
        ),
        pytest.param(
            {"server": {"max_header_bytes": 100}}, "server.max_header_bytes", id="header-cap"
        ),
        pytest.param({"state": {"retention_days": 0}}, "state.retention_days", id="retention"),
        pytest.param({"state": {"redis_prefix": "a b"}}, "state.redis_prefix", id="prefix"),
        pytest.param({"state": {"redis_prefix": "a:b"}}, "state.redis_prefix", id="prefix-colon"),
        pytest.param({"state": {"redis_lease_s": 0.5}}, "state.redis_lease_s", id="lease"),
        pytest.param({"state": {"shared": True}}, "state", id="shared-on-sqlite"),
        pytest.param(
            {"state": {"backend": "redis", "shared": True, "standby": True}},
            "state",
            id="shared-and-standby",
        ),
    ],
)
def test_invalid_config_names_the_key(overrides: dict[str, Any], key: str) -> None:
    """Each invalid setting raises ConfigError whose key is its dotted path."""
    error = config_error(**overrides)
    assert error.key == key
    assert error.message
    assert str(error).startswith(f"{key}: ")


def test_unknown_gpu_type_with_memory_is_accepted() -> None:
    """A GPU type that is not built in is fine once memory_mb is given."""
    settings = load_settings(
        overrides={
            "backends": [
                {"name": "x", "kind": "simulated", "gpus": [{"type": "X9", "memory_mb": 1000}]}
            ]
        }
    )
    assert settings.backends[0].gpus[0].memory_mb == 1000


def test_model_with_only_an_architecture_is_accepted() -> None:
    """A model given by its architecture block needs no weights_mb."""
    assert load_settings().models["tinyllama-1.1b"].weights_mb is None


def test_invalid_value_in_a_file_names_the_key(tmp_path: Path) -> None:
    """A bad value in the user file is reported with its dotted key."""
    path = write(tmp_path, "monitor:\n  stale_after_s: 0\n")
    assert config_error(path).key == "monitor.stale_after_s"


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not YAML raises ConfigError naming the file."""
    path = write(tmp_path, "placement: [unclosed\n  policy: x\n")
    error = config_error(path)
    assert error.key == str(path)
    assert "YAML" in error.message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist raises ConfigError naming it."""
    path = tmp_path / "nope.yaml"
    error = config_error(path)
    assert error.key == str(path)
    assert "cannot read" in error.message


def test_top_level_list_is_a_config_error(tmp_path: Path) -> None:
    """A file whose top level is a list, not a mapping of sections, is refused."""
    path = write(tmp_path, "- placement\n- server\n")
    error = config_error(path)
    assert error.key == str(path)
    assert "mapping" in error.message


def test_several_errors_are_counted_in_the_message() -> None:
    """With more than one invalid value, the first is named and the rest counted."""
    error = config_error(placement={"policy": "x", "backfill_depth": 0})
    assert error.key == "placement.policy"
    assert "1 more error" in error.message


# --- quotas per user ---------------------------------------------------------------------------


def test_for_user_without_override_is_the_default() -> None:
    """A user with no override gets exactly the default limits."""
    quotas = QuotaSettings(default=QuotaLimits(max_concurrent=2, max_priority="low"))
    quota = quotas.for_user("dave")
    assert quota.user == "dave"
    assert quota.max_concurrent == 2
    assert quota.max_priority == "low"
    assert quota.requests_per_minute == 600


def test_for_user_absent_keys_inherit_and_null_is_unlimited() -> None:
    """An absent key inherits the default; an explicit null lifts the limit."""
    quotas = QuotaSettings.model_validate(
        {
            "default": {"max_concurrent": 2, "max_queued": 10, "gpu_seconds_per_hour": 100},
            "users": {"erin": {"max_queued": None, "max_concurrent": 5}},
        }
    )
    quota = quotas.for_user("erin")
    assert quota.max_concurrent == 5
    assert quota.max_queued is None
    assert quota.gpu_seconds_per_hour == 100
    assert quota.max_priority == "high"


def test_for_user_null_from_a_file(tmp_path: Path) -> None:
    """``requests_per_minute: null`` in a user override makes that user unlimited."""
    path = write(
        tmp_path,
        """
        quotas:
          users:
            frank: {requests_per_minute: null, max_priority: critical}
        """,
    )
    quotas = load_settings(path).quotas
    assert quotas.for_user("frank").requests_per_minute is None
    assert quotas.for_user("frank").max_priority == "critical"
    assert quotas.for_user("grace").requests_per_minute == 600


# --- the default file documents itself -------------------------------------------------------

_CATALOGS = ("models", "backends")


def undocumented_lines(text: str) -> list[str]:
    """Lines of a settings file that set a scalar without an inline comment (catalogs aside)."""
    missing = []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith(" "):
            section = stripped.split(":", 1)[0]
            continue
        if section in _CATALOGS or stripped.startswith("- "):
            continue
        key, _, value = stripped.partition(":")
        if not re.fullmatch(r"[a-z_]+", key):
            continue
        if "#" not in value:
            missing.append(line)
    return missing


def test_the_doc_check_catches_an_undocumented_key() -> None:
    """The documentation check flags a bare key and accepts a commented one."""
    text = "server:\n  port: 1\n  host: x   # doc\nmodels:\n  m:\n    weights_mb: 1\n"
    assert undocumented_lines(text) == ["  port: 1"]


def test_every_default_key_is_documented_inline() -> None:
    """Every key of the default file outside the catalogs carries an inline comment."""
    assert undocumented_lines(default_config_text()) == []


def test_every_settings_field_appears_in_the_default_file() -> None:
    """The default file spells out every section and every key of the settings tree."""
    data = yaml.safe_load(default_config_text())
    assert set(data) == set(Settings.model_fields)
    for name, section in SECTIONS.items():
        assert set(data[name]) == set(section.model_fields), name
    assert set(data["quotas"]["default"]) == set(QuotaLimits.model_fields)
    assert set(data["retries"]["circuit_breaker"]) == set(CircuitBreakerSettings.model_fields)


@pytest.mark.parametrize(("days", "seconds"), [(None, None), (0.5, 43_200.0), (30, 2_592_000.0)])
def test_the_store_opened_keeps_finished_requests_for_the_retention(
    days: float | None, seconds: float | None
) -> None:
    """``state.retention_days`` reaches the store that ``open_store`` opens, in seconds."""
    settings = load_settings(overrides={"state": {"backend": "memory", "retention_days": days}})
    store = open_store(settings.state)
    assert isinstance(store, MemoryStore)
    assert store.retention_s == seconds


def test_shared_is_a_redis_setting() -> None:
    """state.shared loads on Redis (default false), and the refusals say why."""
    assert load_settings().state.shared is False
    assert load_settings(overrides={"state": {"backend": "redis", "shared": True}}).state.shared
    assert "backend: redis" in config_error(state={"shared": True}).message
    both = config_error(state={"backend": "redis", "shared": True, "standby": True})
    assert "exclude each other" in both.message

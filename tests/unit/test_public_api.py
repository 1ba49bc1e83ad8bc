"""The package's public surface and the README's quickstart."""

from __future__ import annotations

from pathlib import Path

import gpu_request_router

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_is_importable_and_documented() -> None:
    """Each name in __all__ exists and, where it is a class or function, has a docstring."""
    assert len(gpu_request_router.__all__) == len(set(gpu_request_router.__all__))
    for name in gpu_request_router.__all__:
        value = getattr(gpu_request_router, name)
        if callable(value):
            assert value.__doc__, f"{name} has no docstring"


def test_version_matches_pyproject() -> None:
    """The package version is the one pyproject.toml declares."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{gpu_request_router.__version__}"' in pyproject

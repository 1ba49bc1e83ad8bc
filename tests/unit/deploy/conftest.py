"""Helpers of the deployment-file tests: configuration keys and ``gpurouter`` command lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import typer.main
from pydantic import BaseModel

from gpu_request_router.cli import app
from gpu_request_router.config.config_loader import Settings


def _key_of(env_name: str) -> bool:
    """Whether ``GPUROUTER_<SECTION>__<KEY>...`` names a field of the settings tree."""
    parts = env_name.removeprefix("GPUROUTER_").lower().split("__")
    model: type[BaseModel] = Settings
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if index < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


@pytest.fixture
def config_key() -> Callable[[str], bool]:
    """``config_key("GPUROUTER_AUTH__WORKER_TOKEN")``: does the variable name a real key."""
    return _key_of


def _parse_command(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """The verb and the parsed options of ``gpurouter <argv>``, as the CLI would read them."""
    command: Any = typer.main.get_command(app)
    ctx = command.context_class(command, info_name="gpurouter")
    name = "gpurouter"
    while hasattr(command, "commands"):
        name, command, argv = command.resolve_command(ctx, argv)
        ctx = command.make_context(name, list(argv), parent=ctx)
    return name, ctx.params


@pytest.fixture
def parse_command() -> Callable[[list[str]], tuple[str, dict[str, Any]]]:
    """``parse_command(["serve", "--port", "1"])``: the verb and options, or the CLI's error."""
    return _parse_command

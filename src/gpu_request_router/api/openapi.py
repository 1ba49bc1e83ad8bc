"""The parts of the OpenAPI document that come from the configuration, not from the code.

A body that names a model, a priority class or a task is valid only for the router's own catalog
and classes; the document says so, so that input valid by the document is valid input
(schemathesis' ``positive_data_acceptance`` holds the router to that):

- ``model`` is an enum of the catalog's models, on every route that takes one;
- ``timeout_s`` at most ``server.max_timeout_s``;
- ``priority`` (and the ``X-Priority`` header, and a quota's ``max_priority``) an enum of the
  configured classes;
- on ``POST /v1/requests`` and ``/v1/estimate``, the body is one of a few variants, each pairing
  models with a task they serve and the ``input`` that task is counted from (OpenAI's
  ``messages``, ``prompt`` or ``input``) unless ``shape`` gives the size.
"""

from __future__ import annotations

from typing import Any

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.models.request import Task

__all__ = ["describe_catalog"]

# Request bodies whose ``model`` must be served on their route, by component name, with the
# tasks that route runs.
_OPENAI_BODIES = {
    "ChatBody": {Task.CHAT},
    "CompletionBody": {Task.COMPLETION},
    "EmbeddingBody": {Task.EMBEDDING},
    "ResponsesBody": {Task.CHAT},
}
_SUBMIT_BODY = "SubmitBody"


def describe_catalog(schema: dict[str, Any], settings: Settings) -> None:
    """Write the catalog's models, tasks and priority classes into ``schema`` (in place)."""
    components = schema.get("components", {}).get("schemas", {})
    served = {name: entry.task.served() for name, entry in settings.models.items()}
    for name, tasks in _OPENAI_BODIES.items():
        body = components.get(name)
        if body is not None:
            models = sorted(model for model, can in served.items() if tasks <= can)
            body["properties"]["model"] = _enum(models, body["properties"]["model"])
    classes = list(settings.priorities.classes)
    submit = components.get(_SUBMIT_BODY)
    if submit is not None:
        properties = submit["properties"]
        properties["priority"] = {
            "anyOf": [_enum(classes, {"type": "string"}), {"type": "null"}],
            "description": "A priority class (default: the configured default class).",
        }
        submit["anyOf"] = _task_variants(settings)
        properties["timeout_s"]["anyOf"][0]["maximum"] = settings.server.max_timeout_s
    quota = components.get("QuotaBody")
    if quota is not None:
        quota["properties"]["max_priority"] = {
            "anyOf": [_enum(classes, {"type": "string"}), {"type": "null"}],
            "description": "The highest priority class the user may ask for.",
        }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "header" and parameter.get("name") == "X-Priority":
                    parameter["schema"] = _enum(classes, {"type": "string"})


def _task_variants(settings: Settings) -> list[dict[str, Any]]:
    """One variant per (task given, task run): its models and the input that task reads."""
    groups: dict[tuple[Task | None, Task], list[str]] = {}
    for model, entry in settings.models.items():
        for given in [None, *entry.task.served()]:
            groups.setdefault((given, given or entry.task), []).append(model)
    variants = []

    def order(item: tuple[tuple[Task | None, Task], list[str]]) -> tuple[list[str], str, str]:
        (given, task), models = item
        return sorted(models), given.value if given is not None else "", task.value

    for (given, task), models in sorted(groups.items(), key=order):
        variant: dict[str, Any] = {
            "properties": {
                "model": _enum(sorted(models), {"type": "string"}),
                "task": {"const": given.value} if given is not None else {"type": "null"},
            },
        }
        if given is not None:
            variant["required"] = ["task"]
        if task is not Task.GENERIC:
            counted = {
                "properties": {"input": _INPUTS[task]},
                "required": ["input"],
            }
            sized = {"properties": {"shape": {"type": "object"}}, "required": ["shape"]}
            variant["allOf"] = [{"anyOf": [sized, counted]}]
        variants.append(variant)
    return variants


_COUNT = {"type": "integer", "minimum": 1}
_TOKEN_ID = {"type": "integer", "minimum": 0}
_PROMPT = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": _TOKEN_ID, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": _TOKEN_ID}, "minItems": 1},
    ],
    "description": "A text, or a non-empty list of texts, token ids or token id lists.",
}
_TOKENS = {"type": "integer", "minimum": 1, "maximum": 10_000_000}
_OUTPUT = {"n": _COUNT, "max_tokens": _TOKENS, "max_completion_tokens": _TOKENS}
# What each task reads from ``input`` to count the request's size (other fields are forwarded).
_INPUTS: dict[Task, dict[str, Any]] = {
    Task.CHAT: {
        "type": "object",
        "properties": {
            "messages": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/ChatMessage"},
                "minItems": 1,
            },
            **_OUTPUT,
        },
        "required": ["messages"],
    },
    Task.COMPLETION: {
        "type": "object",
        "properties": {"prompt": _PROMPT, **_OUTPUT},
        "required": ["prompt"],
    },
    Task.EMBEDDING: {"type": "object", "properties": {"input": _PROMPT}, "required": ["input"]},
}


def _enum(values: list[str], base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a string schema) limited to ``values``, keeping its title and description."""
    kept: dict[str, Any] = {key: base[key] for key in ("title", "description") if key in base}
    return {**kept, "type": "string", "enum": values}

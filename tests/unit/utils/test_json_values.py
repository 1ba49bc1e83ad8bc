"""Tests for the rules of the JSON values the router keeps and sends back, and their repair."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gpu_request_router.core.events import ExecutionResult, Failure, FailureKind
from gpu_request_router.runtime import received
from gpu_request_router.utils.json_values import (
    MAX_DEPTH,
    LongInteger,
    first_problem,
    repaired,
    repaired_text,
)


def nested(levels: int, inner: Any = 0) -> Any:
    """``inner`` inside ``levels`` arrays."""
    value = inner
    for _ in range(levels):
        value = [value]
    return value


def sendable(value: Any) -> bool:
    """Whether ``value`` encodes as strict JSON in UTF-8 (what every answer needs)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        return False
    return True


CLEAN = [
    None,
    True,
    0,
    -(10**4000),
    1.5,
    "plain",
    "émoji 😀 and CJK 漢字",
    {"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 3}},
    [0.25] * 2000,
    [1, 2.5, True],
    nested(MAX_DEPTH),
]


@pytest.mark.parametrize("value", CLEAN, ids=range(len(CLEAN)))
def test_values_json_can_carry_break_no_rule(value: Any) -> None:
    """Text, finite numbers and nesting up to 64 levels pass, and are returned unrepaired."""
    assert first_problem(value) is None
    assert repaired(value) is value


BROKEN: dict[str, tuple[Any, tuple[str | int, ...], str]] = {
    "lone-surrogate": ("\ud800", (), "string_unicode"),
    "low-surrogate-in-text": ({"a": ["ok", "x\udfffy"]}, ("a", 1), "string_unicode"),
    "surrogate-in-a-key": ({"k\ud800": 1}, ("k\ufffd",), "string_unicode"),
    "nan": ({"x": math.nan}, ("x",), "finite_number"),
    "infinity-among-floats": ([0.5, 1.5, -math.inf], (2,), "finite_number"),
    "overflowing-sum-is-not-a-problem-itself": ([1e308, 1e308, math.nan], (2,), "finite_number"),
    "too-deep": ({"a": nested(MAX_DEPTH)}, ("a", *[0] * (MAX_DEPTH - 1)), "json_too_deep"),
    "900-deep": (nested(900), (0,) * MAX_DEPTH, "json_too_deep"),
    "long-integer-literal": ({"n": LongInteger("9" * 5000)}, ("n",), "int_parsing_size"),
    "integer-too-long-to-print": ([10**5000], (0,), "int_parsing_size"),
    "a-set": ({"s": {1, 2}}, ("s",), "json_type"),
    "a-non-string-key": ({1: "one"}, ("1",), "json_type"),
}


@pytest.mark.parametrize(("value", "path", "kind"), BROKEN.values(), ids=list(BROKEN))
def test_the_first_broken_rule_is_named_with_its_path(
    value: Any, path: tuple[str | int, ...], kind: str
) -> None:
    """Each rule a value breaks is reported with the path to the offending place."""
    problem = first_problem(value)
    assert problem is not None
    assert (problem.path, problem.kind) == (path, kind)
    assert "\ud800" not in problem.message and sendable(problem.at("output"))


@pytest.mark.parametrize(("value", "path", "kind"), BROKEN.values(), ids=list(BROKEN))
def test_a_repaired_value_can_always_be_sent(
    value: Any, path: tuple[str | int, ...], kind: str
) -> None:
    """The repair of any broken value encodes as strict UTF-8 JSON and breaks no rule."""
    mended = repaired(value)
    assert sendable(mended)
    assert first_problem(mended) is None


def test_repair_keeps_what_it_can() -> None:
    """Lone surrogates become U+FFFD; non-finite numbers and what is too deep become null."""
    value = {"text": "a\ud800b", "n": math.inf, "ok": [1, 2.5], "deep": nested(MAX_DEPTH, "x")}
    mended = repaired(value)
    assert mended["text"] == "a\ufffdb" and mended["n"] is None and mended["ok"] == [1, 2.5]
    assert mended["deep"] == nested(MAX_DEPTH - 1, None)
    assert repaired_text("fine") == "fine"
    assert repaired_text("\udc80\ud800") == "\ufffd\ufffd"


def test_a_backend_answer_that_cannot_be_sent_fails_the_attempt() -> None:
    """At the boundary an unsendable output becomes a backend_error naming its place."""
    outcome = received(ExecutionResult(output={"choices": [{"text": "\ud800"}]}, gpu_seconds=1.0))
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.BACKEND_ERROR
    assert outcome.kind.retryable
    assert outcome.message.endswith("at output.choices[0].text")
    fine = ExecutionResult(output={"choices": [{"text": "hi"}]})
    assert received(fine) is fine


def test_a_backend_failure_message_keeps_its_text_without_lone_surrogates() -> None:
    """A failure's message is kept, with U+FFFD for a lone surrogate; the failure itself stays."""
    failure = Failure(FailureKind.OUT_OF_MEMORY, "CUDA out of memory \udc80", peak_memory_mb=7)
    outcome = received(failure)
    assert outcome == Failure(FailureKind.OUT_OF_MEMORY, "CUDA out of memory \ufffd", 7)
    plain = Failure(FailureKind.CLIENT_ERROR, "bad input")
    assert received(plain) is plain

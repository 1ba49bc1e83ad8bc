r"""The JSON values the router keeps and sends back, and the repair of one it must still send.

Python's ``json`` reads more than JSON can carry back out: a lone surrogate (``"\ud800"``) that
no UTF-8 text holds, ``NaN``, ``Infinity`` and numbers beyond a double (``1e400``), and nesting
as deep as the parser's recursion allows. Kept, such a value breaks every answer that holds it.
So the router checks values where they enter — request bodies at submit (422), backend answers
when received (the attempt fails) — with :func:`first_problem`, and :func:`repaired` mends what
an older version stored before these checks, on the way out.

The rules:

- a string (and an object's key) is Unicode text: no lone surrogate;
- a number is finite, and an integer has at most the 4,300 digits Python converts;
- objects and arrays nest at most :data:`MAX_DEPTH` levels (the outermost is level 1);
- nothing but objects (string keys), arrays, strings, numbers, booleans and null.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "TOO_DEEP",
    "JsonProblem",
    "LongInteger",
    "first_problem",
    "repaired",
    "repaired_text",
]

MAX_DEPTH = 64
"""The deepest nesting of objects and arrays the router accepts (the outermost is level 1)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"
# Python refuses to convert integers of more decimal digits than this (0: no limit).
_MAX_DIGITS = sys.get_int_max_str_digits()
# Integers of at most this many bits have fewer digits than the limit (log2(10) < 3.33).
_SAFE_INT_BITS = int(_MAX_DIGITS * 3.32) if _MAX_DIGITS else None

_STRING = "string_unicode"
_NUMBER = "finite_number"
_INTEGER = "int_parsing_size"
_DEPTH = "json_too_deep"
_TYPE = "json_type"
_MESSAGES = {
    _STRING: "String should be Unicode text (a lone surrogate such as \\ud800 is not)",
    _NUMBER: "Number should be finite (NaN, Infinity and numbers beyond ±1.8e308 are not)",
    _INTEGER: f"Integer should have at most {_MAX_DIGITS} digits",
    _DEPTH: "Objects and arrays should nest at most {depth} levels deep",
    _TYPE: "Value should be an object, array, string, number, true, false or null",
}


class LongInteger:
    """An integer literal with more digits than Python converts, as a parser hands it on.

    :func:`first_problem` reports it; it never reaches the rest of the router.
    """

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits


@dataclass(frozen=True, slots=True)
class JsonProblem:
    """Why a value cannot be kept as JSON: where (``path``), what rule (``kind``), and a message.

    ``kind`` names the rule as pydantic names its validation errors (``string_unicode``,
    ``finite_number``, ``int_parsing_size``, ``json_too_deep``, ``json_type``).
    """

    path: tuple[str | int, ...]
    kind: str
    message: str

    def at(self, root: str) -> str:
        """The message with the place, e.g. ``... at output.choices[0].text``."""
        where = root
        for part in self.path:
            where += f"[{part}]" if isinstance(part, int) else f".{part}"
        return f"{self.message} at {where}"


TOO_DEEP = JsonProblem((), _DEPTH, _MESSAGES[_DEPTH].format(depth=MAX_DEPTH))
"""The problem of a whole value nested too deep (where a parser gave up before any path)."""


def first_problem(value: object, max_depth: int = MAX_DEPTH) -> JsonProblem | None:
    """The first place (depth first) where ``value`` breaks a rule of the module, or ``None``."""
    path: list[str | int] = []
    kind = _check(value, 0, max_depth, path)
    if kind is None:
        return None
    path.reverse()
    return JsonProblem(tuple(path), kind, _MESSAGES[kind].format(depth=max_depth))


def _bad_text(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _clean_numbers(items: list[Any] | tuple[Any, ...]) -> bool:
    """Whether every item is a finite number, told at C speed (``False``: look one by one)."""
    try:
        return math.isfinite(math.fsum(items))
    except (TypeError, ValueError, OverflowError):
        return False


def _check(value: object, depth: int, max_depth: int, path: list[str | int]) -> str | None:
    """The rule ``value`` breaks, if any; the path to it is appended innermost first."""
    if isinstance(value, str):
        return _STRING if _bad_text(value) else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        if _SAFE_INT_BITS is None or value.bit_length() <= _SAFE_INT_BITS:
            return None
        try:
            str(value)
        except ValueError:
            return _INTEGER
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else _NUMBER
    if isinstance(value, dict):
        if depth >= max_depth:
            return _DEPTH
        for key, item in value.items():
            if not isinstance(key, str):
                path.append(str(key))
                return _TYPE
            if _bad_text(key):
                path.append(repaired_text(key))
                return _STRING
            kind = _check(item, depth + 1, max_depth, path)
            if kind is not None:
                path.append(key)
                return kind
        return None
    if isinstance(value, list | tuple):
        if depth >= max_depth:
            return _DEPTH
        if value and isinstance(value[0], float) and _clean_numbers(value):
            return None
        for index, item in enumerate(value):
            kind = _check(item, depth + 1, max_depth, path)
            if kind is not None:
                path.append(index)
                return kind
        return None
    return _INTEGER if isinstance(value, LongInteger) else _TYPE


def repaired_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (the replacement character)."""
    return _SURROGATE.sub(_REPLACEMENT, text) if _bad_text(text) else text


def repaired(value: Any, max_depth: int = MAX_DEPTH) -> Any:
    """``value`` itself when it breaks no rule, else a copy that can be sent.

    In the copy lone surrogates become U+FFFD, and what cannot be sent at all — a number that is
    not finite or too long, anything nested deeper than ``max_depth``, a value of another type —
    becomes null.
    """
    if first_problem(value, max_depth) is None:
        return value
    return _mended(value, 0, max_depth)


def _mended(value: Any, depth: int, max_depth: int) -> Any:
    if isinstance(value, str):
        return repaired_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value if _check(value, depth, max_depth, []) is None else None
    if isinstance(value, dict | list | tuple) and depth >= max_depth:
        return None
    if isinstance(value, dict):
        return {
            repaired_text(str(key)): _mended(item, depth + 1, max_depth)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mended(item, depth + 1, max_depth) for item in value]
    return None

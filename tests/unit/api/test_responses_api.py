"""The Responses API's translation: its body to a chat call, chat chunks to its events."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gpu_request_router.api.routes.responses_api import (
    ResponseEvents,
    chat_payload,
    response_object,
)

BODY: dict[str, Any] = {"model": "m", "input": "hi", "stream": True}


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return _sse({"id": "c", "object": "chat.completion.chunk", "choices": choices, **extra})


WORDS = ["one", " two", " three"]
CHAT_STREAM = b"".join(
    [
        *(_chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in WORDS),
        _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        _chunk([], usage={"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}),
        b"data: [DONE]\n\n",
    ]
)


def _events(raw: list[bytes]) -> list[dict[str, Any]]:
    parsed = []
    for event in raw:
        kind, data = event.decode().strip().split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {body['type']}"
        parsed.append(body)
    return parsed


def _run(pieces: list[bytes]) -> list[dict[str, Any]]:
    events = ResponseEvents("req_1", 10, BODY)
    raw = events.opening()
    for piece in pieces:
        raw += events.feed(piece)
    return _events(raw + events.failed())


def test_a_whole_chat_stream_becomes_the_responses_events() -> None:
    """Deltas per piece, the text done, then ``response.completed`` with text and usage."""
    events = _run([CHAT_STREAM])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "one two three"
    assert events[-1]["response"]["usage"]["output_tokens"] == 3


@given(st.lists(st.integers(0, len(CHAT_STREAM)), max_size=12))
def test_the_events_do_not_depend_on_where_the_bytes_were_cut(cuts: list[int]) -> None:
    """A passed-through stream arrives cut anywhere (CRLF too): the events are the same."""
    bounds = [0, *sorted(cuts), len(CHAT_STREAM)]
    pieces = [CHAT_STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert _run(pieces) == _run([CHAT_STREAM])
    crlf = CHAT_STREAM.replace(b"\n", b"\r\n")
    assert _run([crlf[:7], crlf[7:]]) == _run([CHAT_STREAM])


def test_a_stream_that_breaks_ends_with_response_failed() -> None:
    """No ``[DONE]``: the last event is ``response.failed`` with the text so far."""
    events = _run([CHAT_STREAM[: CHAT_STREAM.index(b"data: [DONE]")][:200]])
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    assert "response.completed" not in [e["type"] for e in events]


def test_a_body_becomes_a_chat_call() -> None:
    """Instructions lead as a system message; parts are joined; the limit is max_tokens."""
    chat = chat_payload(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Rule."},
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"text": "b"}]},
            ],
            "max_output_tokens": 9,
            "temperature": 0.5,
            "stream": True,
        }
    )
    assert chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Rule."},
            {"role": "user", "content": "ab"},
        ],
        "temperature": 0.5,
        "max_tokens": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert chat_payload({"model": "m", "input": "x"}) == {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
    }


def test_an_answer_cut_at_the_limit_is_an_incomplete_response() -> None:
    """``finish_reason: length`` is ``incomplete`` for ``max_output_tokens``; else completed."""
    answer = {
        "created": 5,
        "choices": [{"message": {"content": "a b"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }
    cut = response_object("req_1", {"model": "m", "input": "x"}, answer)
    assert (cut["status"], cut["incomplete_details"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    assert cut["usage"]["total_tokens"] == 3 and cut["id"] == "resp_req_1"
    answer["choices"][0]["finish_reason"] = "stop"  # type: ignore[index]
    whole = response_object("req_1", {"model": "m", "input": "x"}, answer)
    assert whole["status"] == "completed" and whole["incomplete_details"] is None

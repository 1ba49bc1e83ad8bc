"""The store codec: requests and audit entries round-trip through JSON without loss."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.models.request import (
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    ResourceHints,
    Shape,
    Task,
    Transition,
)
from gpu_request_router.store.codec import (
    CODEC_VERSION,
    FIXED_FIELDS,
    STATE_FIELDS,
    CodecError,
    request_fixed_to_json,
    request_from_json,
    request_state_to_json,
    transition_from_json,
    transition_to_json,
)

S = RequestStatus

# Floats as a clock or a duration may hold them: any finite value, the infinities, -0.0.
floats = st.floats(allow_nan=False)
small_ints = st.integers(min_value=-(2**63), max_value=2**63)
texts = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | floats | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
placements = st.builds(
    Placement,
    worker=texts,
    gpu_ids=st.lists(texts, min_size=1, max_size=4).map(tuple),
    reason=texts,
)
errors = st.builds(ErrorInfo, type=texts, message=texts)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """A request with arbitrary fields, moved through a random legal life."""
    request = Request(
        id=draw(texts),
        user=draw(texts),
        model=draw(texts),
        task=draw(st.sampled_from(Task)),
        priority=draw(texts),
        estimate=Estimate(
            gpu_memory_mb=draw(small_ints),
            weights_mb=draw(small_ints),
            kv_cache_mb=draw(small_ints),
            activations_mb=draw(small_ints),
            duration_s=draw(st.dictionaries(texts, floats, max_size=3)),
            gpu_count=draw(st.integers(1, 8)),
        ),
        created_at=draw(floats | st.integers()),
        input=draw(st.dictionaries(texts, json_values, max_size=4)),
        shape=draw(st.builds(Shape, small_ints, small_ints, small_ints)),
        resources=draw(
            st.builds(ResourceHints, st.none() | small_ints, small_ints, st.none() | texts)
        ),
        timeout_s=draw(floats),
        metadata=draw(st.dictionaries(texts, texts, max_size=3)),
        idempotency_key=draw(st.none() | texts),
        fingerprint=draw(texts),
        synchronous=draw(st.booleans()),
    )
    # A zero queued_at next to a non-zero created_at must survive (__post_init__ would fill it).
    if draw(st.booleans()):
        request.queued_at = draw(floats)
    for _ in range(draw(st.integers(0, 6))):
        allowed = [to for to in S if request.can_transition(to)]
        if not allowed:
            break
        to = draw(st.sampled_from(allowed))
        request.transition(
            to,
            draw(floats),
            placement=draw(placements) if to is S.DISPATCHING else None,
            result=draw(json_values) if to is S.SUCCEEDED else None,
            error=draw(st.none() | errors),
        )
    return request


def fields_of(request: Request) -> list[Any]:
    """Every field's value, in declaration order (Request has no __eq__)."""
    return [getattr(request, field.name) for field in dataclasses.fields(Request)]


@settings(max_examples=300)
@given(requests())
def test_request_round_trips_losslessly(request: Request) -> None:
    """Decoding an encoded request gives every field back, with the same types."""
    fixed, state = request_fixed_to_json(request), request_state_to_json(request)
    decoded = request_from_json(fixed, state)
    assert fields_of(decoded) == fields_of(request)
    # The texts again also tell -0.0 from 0.0 and 1 from 1.0.
    assert (request_fixed_to_json(decoded), request_state_to_json(decoded)) == (fixed, state)
    # One object with every field (as schema 2 of the SQLite store wrote) decodes alike.
    whole = json.dumps({**json.loads(fixed), **json.loads(state)})
    assert request_state_to_json(request_from_json(whole)) == state
    assert type(decoded.task) is Task
    assert type(decoded.status) is RequestStatus
    if decoded.placement is not None:
        assert type(decoded.placement.gpu_ids) is tuple


transitions = st.builds(
    Transition,
    request_id=texts,
    seq=st.integers(0, 1000),
    from_status=st.none() | st.sampled_from(S),
    to_status=st.sampled_from(S),
    at=floats,
    attempt=st.integers(0, 100),
    actor=texts,
    detail=texts,
)


@given(transitions)
def test_transition_round_trips_losslessly(transition: Transition) -> None:
    """Decoding an encoded audit entry gives an equal entry, statuses as enums."""
    text = transition_to_json(transition)
    decoded = transition_from_json(text)
    assert decoded == transition
    assert transition_to_json(decoded) == text
    assert type(decoded.to_status) is RequestStatus


def test_every_request_field_is_encoded_once_with_the_version() -> None:
    """The two parts name every Request field between them, each once, plus the format version."""
    request = Request(
        id="r1",
        user="u",
        model="m",
        task=Task.CHAT,
        priority="normal",
        estimate=Estimate(1, 0, 1, 0, {"a100": 2.5}),
        created_at=1.0,
    )
    fixed = json.loads(request_fixed_to_json(request))
    state = json.loads(request_state_to_json(request))
    assert fixed.pop("v") == state.pop("v") == CODEC_VERSION
    assert (set(fixed), set(state)) == (FIXED_FIELDS, STATE_FIELDS)
    assert not FIXED_FIELDS & STATE_FIELDS
    assert {field.name for field in dataclasses.fields(Request)} == FIXED_FIELDS | STATE_FIELDS
    data = {**fixed, **state}
    assert data["task"] == "chat"
    assert data["status"] == "queued"
    assert data["estimate"]["duration_s"] == {"a100": 2.5}


def test_every_transition_field_is_encoded_with_the_version() -> None:
    """The encoding of an audit entry names every Transition field, plus the format version."""
    entry = Transition("r1", 0, None, S.QUEUED, 1.0, 0, "u")
    data = json.loads(transition_to_json(entry))
    assert data.pop("v") == CODEC_VERSION
    assert set(data) == {field.name for field in dataclasses.fields(Transition)}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"id": "r1"}',  # no version
        '{"v": 99, "id": "r1"}',  # a version from the future
        '{"v": 1, "id": "r1"}',  # fields missing
    ],
)
def test_a_foreign_text_is_a_codec_error(text: str) -> None:
    """Text that is not a record of a known format version raises CodecError (a ValueError)."""
    with pytest.raises(CodecError):
        request_from_json(text)
    request = Request("r1", "u", "m", Task.CHAT, "normal", Estimate(1, 0, 1, 0, {}), 1.0)
    with pytest.raises(CodecError):  # a good fixed part with a foreign state
        request_from_json(request_fixed_to_json(request), text)
    with pytest.raises(ValueError, match=r"transition|version"):
        transition_from_json(text)


def test_a_bad_enum_value_is_a_codec_error() -> None:
    """An unknown status is reported as a malformed record, not a bare ValueError."""
    entry = json.loads(transition_to_json(Transition("r1", 0, None, S.QUEUED, 1.0, 0, "u")))
    entry["to_status"] = "vanished"
    with pytest.raises(CodecError, match="malformed"):
        transition_from_json(json.dumps(entry))

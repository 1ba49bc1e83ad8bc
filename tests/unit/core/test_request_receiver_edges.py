"""Submission cases that mutation testing found unchecked: refusals and what they report."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from core_harness import Harness

from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.exceptions import InvalidRequest, QuotaExceeded, Unschedulable
from gpu_request_router.models.request import ResourceHints, Shape
from gpu_request_router.testing import chat, reading


@pytest.mark.parametrize("name", ["", "k" * 65])
def test_a_label_name_out_of_bounds_names_the_metadata(harness_for, name: str) -> None:
    """An empty or overlong metadata label name is refused on the field "metadata"."""
    h: Harness = harness_for()
    submission = Submission(model="llama-3-8b", metadata={name: "v"})
    with pytest.raises(InvalidRequest) as info:
        h.engine.receiver.submit(submission, Caller("alice"), h.now)
    assert info.value.field == "metadata"


def test_max_queued_retry_after_is_when_the_running_request_should_end(harness_for) -> None:
    """The wait offered past max_queued is the running request's estimated time left."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1, quota={"max_queued": 1})
    running = h.submit(chat(max_tokens=900))
    duration = h.dispatch_of(running).request.estimate.duration_on("H100-80GB")
    assert duration > 1.0
    h.submit(chat())
    h.now += 0.5
    with pytest.raises(QuotaExceeded) as info:
        h.submit(chat())
    assert info.value.retry_after_s == pytest.approx(duration - 0.5)


def test_a_request_no_gpu_could_ever_hold_is_refused_on_its_resources(harness_for) -> None:
    """Memory beyond every GPU is Unschedulable on "resources" and counted for the user."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    with pytest.raises(Unschedulable) as info:
        h.submit(chat(resources=ResourceHints(gpu_memory_mb=10**6)))
    assert info.value.field == "resources"
    assert str(info.value) == (
        "resources: needs 1000000 MiB on each of 1 GPU(s); no worker of the fleet has that"
    )
    with pytest.raises(Unschedulable) as typed:
        h.submit(chat(resources=ResourceHints(gpu_count=2, gpu_type="L4-24GB")))
    assert str(typed.value).endswith(
        "on each of 2 GPU(s) of type L4-24GB; no worker of the fleet has that"
    )
    assert h.engine.router.metrics.counts_of("alice")["rejected"] == {"unschedulable": 2}


_BASE = Submission(
    model="llama-3-8b",
    task="chat",
    input={"messages": [{"role": "user", "content": "hi"}]},
    shape=Shape(2, 300, 40),
    priority="high",
    resources=ResourceHints(gpu_memory_mb=30_000, gpu_count=1, gpu_type="H100-80GB"),
    timeout_s=60.0,
    metadata={"team": "a"},
    idempotency_key="k1",
)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "qwen2.5-7b"},
        {"task": "completion"},
        {"input": {"messages": [{"role": "user", "content": "ho"}]}},
        {"shape": Shape(2, 300, 41)},
        {"shape": None},
        {"priority": "low"},
        {"resources": ResourceHints(gpu_memory_mb=30_001, gpu_count=1, gpu_type="H100-80GB")},
        {"resources": ResourceHints(gpu_memory_mb=30_000, gpu_count=2, gpu_type="H100-80GB")},
        {"resources": ResourceHints(gpu_memory_mb=30_000, gpu_count=1, gpu_type=None)},
        {"timeout_s": 61.0},
        {"metadata": {"team": "b"}},
    ],
)
def test_any_change_to_the_body_changes_its_fingerprint(change: dict[str, object]) -> None:
    """An idempotent retry is told from a conflicting body by every field but the key."""
    changed = dataclasses.replace(_BASE, **change)  # type: ignore[arg-type]
    assert changed.fingerprint() != _BASE.fingerprint()
    assert dataclasses.replace(changed, idempotency_key="k2").fingerprint() == changed.fingerprint()


def test_the_fingerprint_is_the_sha256_of_the_canonical_body() -> None:
    """Fingerprints are stored with their requests, so their form is part of the stored data.

    A router upgraded between a request and its retry must still see the same body: the digest
    is SHA-256 of the body as compact JSON with sorted keys, written out here by hand.
    """
    canonical = (
        '{"input":{"messages":[{"content":"hi","role":"user"}]},"metadata":{"team":"a"},'
        '"model":"llama-3-8b","priority":"high","resources":[30000,1,"H100-80GB"],'
        '"shape":[2,300,40],"task":"chat","timeout_s":60.0}'
    )
    assert _BASE.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()


def test_labels_up_to_the_limits_are_kept_and_a_value_not_a_string_is_refused(
    harness_for,
) -> None:
    """A value of 512 characters is a label; a number is not one (strings only)."""
    h: Harness = harness_for()
    labels = {"team": "t" * 512, "run": ""}
    request = h.submit(dataclasses.replace(chat(), metadata=labels))
    assert request.metadata == labels
    with pytest.raises(InvalidRequest) as info:
        h.submit(dataclasses.replace(chat(), metadata={"team": 7}))
    assert info.value.field == "metadata.team"
    assert str(info.value) == "metadata.team: values must be strings of 512 characters at most"


def test_a_batch_of_none_is_refused_with_why(harness_for) -> None:
    """The shape's batch size must be at least 1, and the message says so."""
    h: Harness = harness_for()
    with pytest.raises(InvalidRequest) as info:
        h.submit(chat(shape=Shape(0, 10, 10)))
    assert str(info.value) == "shape.batch_size: must be at least 1"


def test_a_dispatch_names_the_gpus_backend_not_its_workers_name(harness_for) -> None:
    """Work goes out through the backend that reported the GPU (a worker may be named apart)."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    h.apply(h.router.readings([reading("host-9001", 0, backend="sim")], h.now, worker="sim"))
    h.apply(h.router.cordon("sim:0", h.now))
    dispatch = h.dispatch_of(h.submit(chat()))
    assert (dispatch.backend, dispatch.placement.worker) == ("sim", "host-9001")


def test_an_idempotency_key_of_one_character_is_a_key(harness_for) -> None:
    """The shortest key is one printable character; it makes the second submit a replay."""
    h: Harness = harness_for()
    first = h.submit(chat(idempotency_key="k"))
    assert h.submit(chat(idempotency_key="k")).id == first.id

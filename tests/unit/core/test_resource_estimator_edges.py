"""Estimator cases that mutation testing found unchecked."""

from __future__ import annotations

import pytest

from gpu_request_router.config import ModelSpec, load_settings
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.exceptions import ContextLengthExceeded, InvalidRequest
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.models.request import Estimate, Shape, Task


def make_estimator() -> ResourceEstimator:
    """A fresh estimator over the default catalog and every built-in GPU type."""
    return ResourceEstimator(load_settings().models, BUILTIN_GPU_TYPES)


def test_an_explicit_single_completion_per_prompt_is_accepted() -> None:
    """A completion with n=1 is valid and makes a batch of one per prompt."""
    shape = make_estimator().shape_of(
        "tinyllama-1.1b", Task.COMPLETION, {"prompt": ["ab", "cd"], "n": 1, "max_tokens": 1}, None
    )
    assert shape == Shape(2, 1, 1)


def test_growing_a_multi_gpu_estimate_after_oom_keeps_its_gpu_count() -> None:
    """An out-of-memory growth of a two-GPU estimate is still an estimate for two GPUs."""
    estimate = Estimate(1000, 500, 300, 200, {"H100-80GB": 1.0}, gpu_count=2)
    grown = make_estimator().grow_after_oom("llama-3-8b", estimate, 1.5, None)
    assert grown.gpu_memory_mb == 1500
    assert grown.gpu_count == 2


def _chat_shape(content: object) -> Shape:
    return make_estimator().shape_of(
        "llama-3-8b",
        Task.CHAT,
        {"messages": [{"role": "user", "content": content}], "max_tokens": 1},
        None,
    )


def test_text_parts_count_as_the_same_text_in_one_string() -> None:
    """Content given as parts is counted as its text parts joined; other parts add nothing."""
    parts = [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "efgh"},
    ]
    assert _chat_shape(parts) == _chat_shape("abcdefgh")
    assert _chat_shape(parts).input_tokens < _chat_shape("abcdefghi").input_tokens


@pytest.mark.parametrize(
    ("input", "field", "message"),
    [
        (["not", "an", "object"], "input", "must be an object, got list"),
        (
            {"messages": [{"role": "user", "content": 7}]},
            "input.messages[0].content",
            "must be a string or a list of content parts",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]},
            "input.messages[0].content[1]",
            "must be a content part object",
        ),
        ({"messages": [{"role": 1, "content": "a"}]}, "input.messages[0].role", "must be a string"),
    ],
)
def test_an_input_that_cannot_be_counted_names_where_and_why(
    input: object, field: str, message: str
) -> None:
    """The 422 says which part of the input is wrong and what was expected there."""
    with pytest.raises(InvalidRequest) as info:
        make_estimator().shape_of("llama-3-8b", Task.CHAT, input, None)  # type: ignore[arg-type]
    assert (info.value.field, info.value.message) == (field, f"{field}: {message}")


def test_a_peak_as_estimated_leaves_the_estimate_as_it_was() -> None:
    """Learning without the shape compares the peak with the estimate's own working memory.

    TinyLlama's activations are derived (not zero), so the working memory is the KV cache plus
    them: a peak equal to the estimate confirms it.
    """
    estimator = make_estimator()
    shape = Shape(1, 100, 2_000)
    first = estimator.estimate("tinyllama-1.1b", shape)
    assert first.kv_cache_mb > first.activations_mb > 0
    took = first.duration_on("H100-80GB")
    estimator.observe("tinyllama-1.1b", "H100-80GB", first, took, first.gpu_memory_mb)
    assert estimator.estimate("tinyllama-1.1b", shape) == first
    # Once the model's factor has grown, the estimate as issued is still the reference.
    big = first.weights_mb + 3 * (first.kv_cache_mb + first.activations_mb)
    estimator.observe("tinyllama-1.1b", "H100-80GB", first, took, big, shape=shape)
    grown = estimator.estimate("tinyllama-1.1b", shape)
    assert grown.gpu_memory_mb > first.gpu_memory_mb
    estimator.observe("tinyllama-1.1b", "H100-80GB", grown, took, grown.gpu_memory_mb)
    assert estimator.estimate("tinyllama-1.1b", shape) == grown


def test_a_peak_of_zero_is_no_measurement() -> None:
    """A backend that reports 0 MiB measured nothing (the weights alone are more): no learning."""
    estimator = make_estimator()
    shape = Shape(1, 100, 2_000)
    first = estimator.estimate("tinyllama-1.1b", shape)
    took = first.duration_on("H100-80GB")
    for _ in range(5):
        estimator.observe("tinyllama-1.1b", "H100-80GB", first, took, 0, shape=shape)
    assert estimator.estimate("tinyllama-1.1b", shape) == first


def test_a_chat_may_ask_for_one_choice() -> None:
    """``n: 1`` is the default made explicit: a batch of one."""
    shape = make_estimator().shape_of(
        "llama-3-8b", Task.CHAT, {"messages": [{"role": "user", "content": "hi"}], "n": 1}, None
    )
    assert shape.batch_size == 1


def test_a_prompt_that_fills_the_context_leaves_no_room_for_an_answer() -> None:
    """Without max_tokens the answer gets what the context leaves, and at least one token."""
    estimator = ResourceEstimator(
        {"m": ModelSpec(task=Task.COMPLETION, weights_mb=1, max_context=100)}, BUILTIN_GPU_TYPES
    )
    assert estimator.shape_of("m", Task.COMPLETION, {"prompt": [1] * 99}, None).output_tokens == 1
    with pytest.raises(ContextLengthExceeded):
        estimator.shape_of("m", Task.COMPLETION, {"prompt": [1] * 100}, None)


def test_learning_skips_what_it_cannot_compare() -> None:
    """A job of no GPU memory teaches no memory; a GPU type the estimate lacks, no duration."""
    estimator = ResourceEstimator(
        {"job": ModelSpec(task=Task.GENERIC, weights_mb=0)}, BUILTIN_GPU_TYPES
    )
    estimate = estimator.estimate("job", Shape(1, 0, 0))
    assert estimate.gpu_memory_mb == 0
    estimator.observe("job", "H100-80GB", estimate, estimate.duration_on("H100-80GB"), 500)
    assert estimator.estimate("job", Shape(1, 0, 0)).gpu_memory_mb == 0
    partial = Estimate(100, 50, 30, 20, {"H100-80GB": 1.0})
    estimator.observe("job", "L4-24GB", partial, 9.0, None)
    assert estimator.estimate("job", Shape(1, 0, 0)).duration_s == estimate.duration_s


@pytest.mark.parametrize(
    ("shape", "field"),
    [
        (Shape(0, 1, 1), "shape.batch_size"),
        (Shape(1, -1, 1), "shape.input_tokens"),
        (Shape(1, 1, -1), "shape.output_tokens"),
    ],
)
def test_an_estimate_of_an_impossible_shape_names_the_count(shape: Shape, field: str) -> None:
    """The estimator checks a shape it is handed directly, and says which count is wrong."""
    with pytest.raises(InvalidRequest) as info:
        make_estimator().estimate("llama-3-8b", shape)
    assert info.value.field == field

"""Tests of the estimator's learning per shape bucket: durations and peak memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.config import ModelSpec, load_settings
from gpu_request_router.core.resource_estimator import (
    DURATION_BUCKET_ENTRIES,
    DURATION_FACTOR_BOUNDS,
    EWMA_ALPHA,
    MEMORY_BUCKET_ENTRIES,
    MEMORY_FACTOR_BOUNDS,
    ResourceEstimator,
    shape_bucket,
)
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.models.request import Shape

MODEL = "llama-3-8b"
H100 = "H100-80GB"
CATALOG = load_settings().models


def fresh() -> ResourceEstimator:
    """An estimator over the default catalog and every built-in GPU type, nothing learned."""
    return ResourceEstimator(CATALOG, BUILTIN_GPU_TYPES)


def uncorrected(estimator: ResourceEstimator, shape: Shape, gpu: str = H100) -> float:
    """The catalog duration of ``shape`` on ``gpu``, without any learned factor."""
    prefill, decode = estimator.throughput(MODEL, gpu)
    return shape.batch_size * shape.input_tokens / prefill + shape.output_tokens / decode


def observe_ratio(
    estimator: ResourceEstimator, shape: Shape, ratio: float, gpu: str = H100
) -> None:
    """Report an execution of ``shape`` on ``gpu`` that took ``ratio`` × the catalog duration."""
    issued = estimator.estimate(MODEL, shape)
    estimator.observe(
        MODEL, gpu, issued, ratio * uncorrected(estimator, shape, gpu), None, shape=shape
    )


def test_a_shape_bucket_is_the_bit_length_of_prefill_and_decode_tokens() -> None:
    """log2 buckets of batch × input and of output tokens; 0 for none."""
    assert shape_bucket(Shape(1, 0, 0)) == (0, 0)
    assert shape_bucket(Shape(1, 1, 1)) == (1, 1)
    assert shape_bucket(Shape(2, 3, 4)) == (3, 3)  # 6 prefill tokens: 4..7
    assert shape_bucket(Shape(1, 1024, 255)) == (11, 8)
    assert shape_bucket(Shape(1, 2047, 256)) == (11, 9)


def test_a_bucket_learns_its_own_factor_and_a_new_one_starts_from_the_pair() -> None:
    """EWMA per bucket; an unseen bucket takes the (model, GPU type) factor, not 1."""
    estimator = fresh()
    small, large = Shape(1, 1200, 90), Shape(1, 6000, 900)
    a, b = shape_bucket(small), shape_bucket(large)
    assert a != b
    observe_ratio(estimator, small, 2.0)
    assert estimator.duration_factor(MODEL, H100, a) == pytest.approx(0.8 + 0.2 * 2.0)
    # Never seen: the pair's factor, which learned from the small shape too.
    assert estimator.duration_factor(MODEL, H100, b) == pytest.approx(1.2)
    assert estimator.estimate(MODEL, large).duration_s[H100] == pytest.approx(
        1.2 * uncorrected(estimator, large)
    )
    observe_ratio(estimator, large, 0.5)
    assert estimator.duration_factor(MODEL, H100, b) == pytest.approx(0.8 * 1.2 + 0.2 * 0.5)
    assert estimator.duration_factor(MODEL, H100, a) == pytest.approx(1.2)  # untouched
    observe_ratio(estimator, small, 2.0)
    assert estimator.duration_factor(MODEL, H100, a) == pytest.approx(0.8 * 1.2 + 0.2 * 2.0)
    # Another GPU type learned nothing; a shape of the same bucket shares the factor.
    assert estimator.duration_factor(MODEL, "L4-24GB", a) == 1.0
    same_bucket = Shape(1, 1500, 100)
    assert shape_bucket(same_bucket) == a
    assert estimator.estimate(MODEL, same_bucket).duration_s[H100] == pytest.approx(
        1.36 * uncorrected(estimator, same_bucket)
    )


def test_without_the_shape_only_the_pair_learns() -> None:
    """An observation without its shape cannot name a bucket: it moves the pair's factor only."""
    estimator = fresh()
    shape = Shape(1, 1200, 90)
    issued = estimator.estimate(MODEL, shape)
    estimator.observe(MODEL, H100, issued, 2 * issued.duration_s[H100], None)
    assert estimator.bucket_counts() == (0, 0)
    assert estimator.duration_factor(MODEL, H100, shape_bucket(shape)) == pytest.approx(1.2)


def test_bucket_factors_are_clamped() -> None:
    """However far off, a bucket's factor stays in [0.1, 10], and so does the pair's."""
    estimator = fresh()
    shape, other = Shape(1, 1200, 90), Shape(1, 10, 10)
    for _ in range(60):
        observe_ratio(estimator, shape, 1e6)
    assert estimator.duration_factor(MODEL, H100, shape_bucket(shape)) == DURATION_FACTOR_BOUNDS[1]
    assert estimator.duration_factor(MODEL, H100, shape_bucket(other)) == DURATION_FACTOR_BOUNDS[1]
    for _ in range(120):
        observe_ratio(estimator, shape, 0.0)
    assert estimator.duration_factor(MODEL, H100, shape_bucket(shape)) == DURATION_FACTOR_BOUNDS[0]


def test_buckets_are_bounded_and_the_least_recently_observed_goes_first() -> None:
    """Past DURATION_BUCKET_ENTRIES keys the least recently observed bucket is dropped."""
    estimator = fresh()
    first, second = Shape(1, 1200, 90), Shape(1, 10, 10)
    observe_ratio(estimator, first, 3.0, "victim")  # first 1.4, pair 1.4
    observe_ratio(estimator, second, 1.0, "victim")  # second 1.32, pair 1.32
    observe_ratio(estimator, first, 3.0, "victim")  # first 1.72 and now the most recent
    pair = 0.8 * 1.32 + 0.2 * 3.0
    assert estimator.duration_factor(MODEL, "victim", shape_bucket(second)) == pytest.approx(1.32)
    # Fill up to the bound with buckets of other (unknown, so H100-like) GPU types.
    for index in range(DURATION_BUCKET_ENTRIES - 2):
        observe_ratio(estimator, first, 1.0, f"other-{index}")
    assert estimator.bucket_counts()[0] == DURATION_BUCKET_ENTRIES
    assert estimator.duration_factor(MODEL, "victim", shape_bucket(second)) == pytest.approx(1.32)
    observe_ratio(estimator, first, 1.0, "one-more")
    assert estimator.bucket_counts()[0] == DURATION_BUCKET_ENTRIES
    # The second bucket was the least recently observed: evicted, it falls back to the pair.
    assert estimator.duration_factor(MODEL, "victim", shape_bucket(second)) == pytest.approx(pair)
    assert estimator.duration_factor(MODEL, "victim", shape_bucket(first)) == pytest.approx(1.72)


_shapes = st.builds(
    Shape,
    batch_size=st.integers(1, 8),
    input_tokens=st.integers(0, 4000),
    output_tokens=st.integers(1, 4000),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_shapes, st.floats(0.0, 1e4)), min_size=1, max_size=30))
def test_every_observation_is_one_clamped_ewma_step_of_its_bucket(
    observations: list[tuple[Shape, float]],
) -> None:
    """The bucket's new factor is clamp((1 − α) × prior + α × sample), prior its factor in force."""
    estimator = fresh()
    low, high = DURATION_FACTOR_BOUNDS
    for shape, ratio in observations:
        bucket = shape_bucket(shape)
        prior = estimator.duration_factor(MODEL, H100, bucket)
        observe_ratio(estimator, shape, ratio)
        expected = min(max((1 - EWMA_ALPHA) * prior + EWMA_ALPHA * ratio, low), high)
        learned = estimator.duration_factor(MODEL, H100, bucket)
        assert learned == pytest.approx(expected, rel=1e-9)
        assert low <= learned <= high
        assert estimator.estimate(MODEL, shape).duration_s[H100] == pytest.approx(
            learned * uncorrected(estimator, shape)
        )
    assert estimator.bucket_counts()[0] <= len({shape_bucket(shape) for shape, _ in observations})


# --- memory ----------------------------------------------------------------------------------

MIB = 2**20
KV_MODEL = "kv"
# A model of KV cache only (1 MiB per token, no weights, no activations): its non-weights
# memory per GPU is exactly input + output tokens MiB.
KV_CATALOG = {
    KV_MODEL: ModelSpec(
        weights_mb=0, kv_bytes_per_token=MIB, activation_bytes_per_token=0, max_context=2**20
    )
}


def kv_estimator() -> ResourceEstimator:
    """An estimator over the KV-only model, nothing learned."""
    return ResourceEstimator(KV_CATALOG, BUILTIN_GPU_TYPES)


def observe_peak(estimator: ResourceEstimator, shape: Shape, ratio: float) -> None:
    """Report a peak of ``ratio`` × the shape's uncorrected KV memory (MiB per GPU)."""
    issued = estimator.estimate(KV_MODEL, shape)
    peak = round(ratio * (shape.input_tokens + shape.output_tokens))
    estimator.observe(KV_MODEL, H100, issued, 1.0, peak, shape=shape)


def test_a_memory_bucket_learns_its_own_factor_and_a_new_one_starts_from_the_model() -> None:
    """Peaks teach the shape's bucket and the model; an unseen bucket takes the model's factor."""
    estimator = kv_estimator()
    short, long = Shape(1, 1000, 100), Shape(1, 1000, 1000)
    a, b = shape_bucket(short), shape_bucket(long)
    assert a != b
    observe_peak(estimator, short, 2.0)
    assert estimator.memory_factor(KV_MODEL, a) == pytest.approx(1.2, rel=1e-3)
    assert estimator.memory_factor(KV_MODEL, b) == pytest.approx(1.2, rel=1e-3)
    observe_peak(estimator, long, 0.5)
    assert estimator.memory_factor(KV_MODEL, b) == pytest.approx(0.8 * 1.2 + 0.1, rel=1e-3)
    assert estimator.memory_factor(KV_MODEL, a) == pytest.approx(1.2, rel=1e-3)  # untouched
    assert estimator.estimate(KV_MODEL, short).kv_cache_mb == round(1.2 * 1100)
    assert estimator.bucket_counts() == (2, 2)


def test_an_out_of_memory_failure_raises_its_bucket_and_never_lowers_it() -> None:
    """grow_after_oom lifts the failed shape's bucket so the shape gets as much; never down."""
    estimator = kv_estimator()
    shape, other = Shape(1, 1000, 100), Shape(1, 10, 10)
    observe_peak(estimator, shape, 3.0)  # bucket 1.4
    issued = estimator.estimate(KV_MODEL, shape)
    grown = estimator.grow_after_oom(KV_MODEL, issued, 1.5, None, shape=shape)
    assert estimator.estimate(KV_MODEL, shape).gpu_memory_mb >= grown.gpu_memory_mb
    assert estimator.memory_factor(KV_MODEL, shape_bucket(shape)) == pytest.approx(
        grown.gpu_memory_mb / 1100, rel=1e-3
    )
    # A smaller growth than the factor already learned leaves the bucket where it is.
    before = estimator.memory_factor(KV_MODEL, shape_bucket(other))
    estimator.grow_after_oom(KV_MODEL, estimator.estimate(KV_MODEL, other), 1.0, None, shape=other)
    assert estimator.memory_factor(KV_MODEL, shape_bucket(other)) >= before


def test_memory_buckets_are_bounded_and_clamped() -> None:
    """Past MEMORY_BUCKET_ENTRIES the least recently observed bucket goes; factors stay bounded."""
    models = {f"kv{index}": KV_CATALOG[KV_MODEL] for index in range(17)}
    estimator = ResourceEstimator(models, BUILTIN_GPU_TYPES)
    shapes = [Shape(1, 2**i, 2**j) for i in range(16) for j in range(16)]  # 256 buckets
    assert len(models) * len(shapes) > MEMORY_BUCKET_ENTRIES
    oldest = shapes[0]
    tokens = oldest.input_tokens + oldest.output_tokens
    estimator.observe(
        "kv0", H100, estimator.estimate("kv0", oldest), 1.0, tokens // 2, shape=oldest
    )
    assert estimator.memory_factor("kv0", shape_bucket(oldest)) == pytest.approx(0.9)
    high = MEMORY_FACTOR_BOUNDS[1]
    for model in models:
        for shape in shapes:
            if (model, shape) == ("kv0", oldest):
                continue
            issued = estimator.estimate(model, shape)
            peak = 1_000_000 * (shape.input_tokens + shape.output_tokens)
            estimator.observe(model, H100, issued, 1.0, peak, shape=shape)
            assert estimator.bucket_counts()[1] <= MEMORY_BUCKET_ENTRIES
    assert estimator.bucket_counts()[1] == MEMORY_BUCKET_ENTRIES
    # The oldest bucket was dropped: it falls back to its model's factor, clamped at the top.
    assert estimator.memory_factor("kv0", shape_bucket(oldest)) == high
    assert estimator.memory_factor("kv16", shape_bucket(shapes[-1])) == high
    assert estimator.estimate("kv16", shapes[-1]).kv_cache_mb == high * (2**15 + 2**15)

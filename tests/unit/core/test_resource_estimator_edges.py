"""Estimator cases that mutation testing found unchecked."""

from __future__ import annotations

from gpu_request_router.config import load_settings
from gpu_request_router.core.resource_estimator import ResourceEstimator
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

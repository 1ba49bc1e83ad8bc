"""Tests of the resource estimator: model figures, memory, shapes, durations and learning."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gpu_request_router.config import ModelSpec, Settings, load_settings
from gpu_request_router.config.config_loader import Architecture
from gpu_request_router.core.resource_estimator import (
    ModelProfile,
    ResourceEstimator,
    profile_from_spec,
)
from gpu_request_router.exceptions import InvalidRequest, UnknownModel
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES, gpu_type
from gpu_request_router.models.request import Estimate, ResourceHints, Shape, Task

MIB = 2**20
LLAMA_WEIGHTS_MB = 15317
LLAMA_KV = 131072
H100 = BUILTIN_GPU_TYPES["H100-80GB"]
A100 = BUILTIN_GPU_TYPES["A100-80GB"]
H200 = BUILTIN_GPU_TYPES["H200-141GB"]
L4 = BUILTIN_GPU_TYPES["L4-24GB"]


def llama3_8b_architecture(**changes: Any) -> Architecture:
    """The config.json figures of Llama-3-8B."""
    fields: dict[str, Any] = {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "dtype": "bfloat16",
    }
    fields.update(changes)
    return Architecture(**fields)


def tinyllama_architecture(**changes: Any) -> Architecture:
    """The config.json figures of TinyLlama-1.1B."""
    fields: dict[str, Any] = {
        "num_hidden_layers": 22,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 32000,
        "dtype": "float16",
    }
    fields.update(changes)
    return Architecture(**fields)


@pytest.fixture(scope="module")
def settings() -> Settings:
    """The packaged default settings."""
    return load_settings()


@pytest.fixture
def estimator(settings: Settings) -> ResourceEstimator:
    """A fresh estimator over the default catalog and every built-in GPU type."""
    return ResourceEstimator(settings.models, BUILTIN_GPU_TYPES)


def ceil_mib(size: float) -> int:
    """Bytes to MiB, rounded up."""
    return math.ceil(size / MIB)


# --- model figures -------------------------------------------------------------------------


def test_kv_bytes_per_token_of_llama3_8b_from_its_architecture() -> None:
    """Llama-3-8B keeps 32 layers × 8 KV heads × 128 dims × K and V × 2 bytes per token."""
    profile = profile_from_spec("l3", ModelSpec(architecture=llama3_8b_architecture()))
    assert profile.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 131072


def test_llama3_8b_architecture_matches_the_catalog_weights() -> None:
    """The derived Llama-3-8B parameter count is 8.03e9 and its bf16 weights round to 15317 MiB."""
    profile = profile_from_spec("l3", ModelSpec(architecture=llama3_8b_architecture()))
    assert profile.params == 8_030_261_248
    assert profile.weights_bytes == 2 * 8_030_261_248
    assert ceil_mib(profile.weights_bytes) == LLAMA_WEIGHTS_MB


def test_kv_bytes_per_token_of_tinyllama_from_its_architecture() -> None:
    """TinyLlama-1.1B keeps 22 layers × 4 KV heads × 64 dims × K and V × 2 bytes per token."""
    profile = profile_from_spec("tiny", ModelSpec(architecture=tinyllama_architecture()))
    assert profile.kv_bytes_per_token == 22 * 4 * 64 * 2 * 2 == 22528


def test_tinyllama_params_weights_activations_and_logits() -> None:
    """TinyLlama has 1,100,048,384 parameters (≈1.1e9), 2 bytes each, and the documented extras."""
    profile = profile_from_spec("tiny", ModelSpec(architecture=tinyllama_architecture()))
    embeddings = 32000 * 2048
    per_layer = 2048 * 32 * 64 + 2 * 2048 * 4 * 64 + 32 * 64 * 2048 + 3 * 2048 * 5632 + 2 * 2048
    expected = embeddings + 22 * per_layer + 2048 + embeddings
    assert expected == 1_100_048_384
    assert profile.params == expected
    assert profile.params == pytest.approx(1.1e9, rel=0.01)
    assert profile.weights_bytes == 2_200_096_768
    assert ceil_mib(profile.weights_bytes) == 2099
    assert profile.activation_bytes_per_token == 2 * (3 * 2048 + 3 * 5632) == 46080
    assert profile.attention_bytes_per_token == 2 * (2 * 2048 + 2 * 32 * 64 + 2 * 4 * 64) + 4 * 32
    assert profile.score_bytes_per_pair == 0
    assert profile.logits_bytes_per_sequence == 32000 * 4


def test_tied_embeddings_drop_the_output_head() -> None:
    """Tying the word embeddings removes vocab × hidden parameters."""
    untied = profile_from_spec("a", ModelSpec(architecture=tinyllama_architecture()))
    tied = profile_from_spec(
        "b", ModelSpec(architecture=tinyllama_architecture(tie_word_embeddings=True))
    )
    assert untied.params - tied.params == 32000 * 2048


def test_kv_heads_and_head_dim_default_from_the_attention_heads() -> None:
    """Without num_key_value_heads and head_dim, nkv = nh and hd = hidden // nh."""
    arch = tinyllama_architecture(num_key_value_heads=None, head_dim=None, dtype="float32")
    profile = profile_from_spec("mha", ModelSpec(architecture=arch))
    assert profile.kv_bytes_per_token == 22 * 32 * 64 * 2 * 4


def test_profile_of_the_tinyllama_catalog_entry(estimator: ResourceEstimator) -> None:
    """The packaged tinyllama-1.1b entry is derived from its architecture block."""
    profile = estimator.profile("tinyllama-1.1b")
    assert profile.task is Task.COMPLETION
    assert profile.params == 1_100_048_384
    assert profile.kv_bytes_per_token == 22528
    assert profile.max_context == 2048
    assert dict(profile.throughput) == {}


def test_llama3_8b_catalog_figures(estimator: ResourceEstimator) -> None:
    """llama-3-8b takes its weights, KV figure and throughput from the catalog as given."""
    profile = estimator.profile("llama-3-8b")
    assert isinstance(profile, ModelProfile)
    assert profile.weights_bytes == LLAMA_WEIGHTS_MB * MIB
    assert profile.kv_bytes_per_token == LLAMA_KV
    assert profile.activation_bytes_per_token == 0
    assert profile.logits_bytes_per_sequence == 0
    assert profile.params == LLAMA_WEIGHTS_MB * MIB // 2
    assert profile.throughput["H100-80GB"] == (12000.0, 90.0)


def test_explicit_catalog_figures_win_over_derived_ones() -> None:
    """weights_mb and kv_bytes_per_token given next to an architecture override the derivation."""
    spec = ModelSpec(weights_mb=100, kv_bytes_per_token=5, architecture=tinyllama_architecture())
    profile = profile_from_spec("mixed", spec)
    assert profile.weights_bytes == 100 * MIB
    assert profile.kv_bytes_per_token == 5
    assert profile.activation_bytes_per_token == 46080
    assert profile.params == 1_100_048_384


# --- memory --------------------------------------------------------------------------------

_GRID = [(batch, seq) for batch in (1, 4, 16) for seq in (512, 2048, 8192)]


@pytest.mark.parametrize(("batch", "seq"), _GRID)
def test_llama3_8b_memory_grid(estimator: ResourceEstimator, batch: int, seq: int) -> None:
    """Memory is weights + 131072 B × batch × (input + output), in MiB rounded up."""
    out = 128
    shape = Shape(batch, seq - out, out)
    estimate = estimator.estimate("llama-3-8b", shape)
    expected = math.ceil((LLAMA_WEIGHTS_MB * MIB + LLAMA_KV * batch * seq) / MIB)
    assert estimate.gpu_memory_mb == expected
    assert estimate.weights_mb == LLAMA_WEIGHTS_MB
    assert estimate.kv_cache_mb == ceil_mib(LLAMA_KV * batch * seq)
    assert estimate.activations_mb == 0
    assert estimate.gpu_count == 1


def test_largest_grid_point_is_16_gib_of_kv_cache(estimator: ResourceEstimator) -> None:
    """16 sequences of 8192 tokens of llama-3-8b hold exactly 16 GiB of KV cache."""
    estimate = estimator.estimate("llama-3-8b", Shape(16, 8064, 128))
    assert estimate.kv_cache_mb == 16384
    assert estimate.gpu_memory_mb == 15317 + 16384


def test_activations_and_logits_count_for_an_architecture_model(
    estimator: ResourceEstimator,
) -> None:
    """TinyLlama adds its MLP stage over max(input, 1) tokens and fp32 logits per sequence."""
    estimate = estimator.estimate("tinyllama-1.1b", Shape(2, 100, 50))
    kv = 22528 * 2 * 150
    activations = 46080 * 2 * 100 + 128000 * 2
    assert estimate.weights_mb == 2099
    assert estimate.kv_cache_mb == ceil_mib(kv) == 7
    assert estimate.activations_mb == ceil_mib(activations) == 10
    assert estimate.gpu_memory_mb == 2099 + 7 + 10


def test_a_request_without_prompt_tokens_still_holds_one_token_of_activations(
    estimator: ResourceEstimator,
) -> None:
    """Activations count max(input, 1) tokens per sequence, so an empty prompt counts as one."""
    estimate = estimator.estimate("tinyllama-1.1b", Shape(64, 0, 10))
    assert estimate.activations_mb == ceil_mib(46080 * 64 * 1 + 128000 * 64) == 11


def test_two_gpus_halve_the_memory_per_gpu(estimator: ResourceEstimator) -> None:
    """Tensor parallelism over 2 GPUs splits weights and KV cache evenly."""
    shape = Shape(4, 2000, 48)
    one = estimator.estimate("llama-3-8b", shape)
    two = estimator.estimate("llama-3-8b", shape, ResourceHints(gpu_count=2))
    assert one.gpu_memory_mb == 15317 + 1024
    assert two.gpu_count == 2
    assert two.weights_mb == math.ceil(15317 / 2) == 7659
    assert two.kv_cache_mb == 512
    assert two.gpu_memory_mb == 7659 + 512


def test_a_memory_hint_raises_the_estimate(estimator: ResourceEstimator) -> None:
    """A hint above the computed figure becomes the estimate, the breakdown still adding up."""
    estimate = estimator.estimate(
        "tinyllama-1.1b", Shape(2, 100, 50), ResourceHints(gpu_memory_mb=10000)
    )
    assert estimate.gpu_memory_mb == 10000
    assert estimate.weights_mb == 2099
    assert estimate.kv_cache_mb + estimate.activations_mb == 10000 - 2099
    assert estimate.kv_cache_mb == (10000 - 2099) * 7 // 17


def test_a_memory_hint_lowers_the_estimate_but_not_below_the_weights(
    estimator: ResourceEstimator,
) -> None:
    """A hint below the computed figure lowers it, yet never under the weights."""
    shape = Shape(4, 2000, 48)
    lowered = estimator.estimate("llama-3-8b", shape, ResourceHints(gpu_memory_mb=16000))
    assert lowered.gpu_memory_mb == 16000
    assert lowered.kv_cache_mb == 16000 - 15317
    assert lowered.activations_mb == 0
    floor = estimator.estimate("llama-3-8b", shape, ResourceHints(gpu_memory_mb=100))
    assert floor.gpu_memory_mb == 15317
    assert (floor.kv_cache_mb, floor.activations_mb) == (0, 0)


@pytest.mark.parametrize(
    ("hints", "field"),
    [
        (ResourceHints(gpu_count=0), "resources.gpu_count"),
        (ResourceHints(gpu_memory_mb=0), "resources.gpu_memory_mb"),
    ],
)
def test_invalid_hints_are_rejected(
    estimator: ResourceEstimator, hints: ResourceHints, field: str
) -> None:
    """A GPU count or memory hint below 1 raises InvalidRequest naming the field."""
    with pytest.raises(InvalidRequest) as caught:
        estimator.estimate("llama-3-8b", Shape(1, 10, 10), hints)
    assert caught.value.field == field


def test_a_negative_shape_is_rejected(estimator: ResourceEstimator) -> None:
    """estimate() refuses a shape with negative token counts."""
    with pytest.raises(InvalidRequest) as caught:
        estimator.estimate("llama-3-8b", Shape(1, -1, 10))
    assert caught.value.field == "shape.input_tokens"


# --- shapes --------------------------------------------------------------------------------


def test_chat_shape_counts_messages_parts_n_and_max_tokens(estimator: ResourceEstimator) -> None:
    """Chat input counts ceil(chars / 4) + 4 per message + 2, n sequences, max_tokens new ones."""
    messages = [
        {"role": "system", "content": "You are helpful."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "x" * 10},
                {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    shape = estimator.shape_of(
        "llama-3-8b", Task.CHAT, {"messages": messages, "n": 2, "max_tokens": 100}, None
    )
    assert shape == Shape(2, (4 + 4) + (3 + 4) + (0 + 4) + 2, 100)


def test_chat_output_falls_back_to_max_completion_tokens_then_the_model_default(
    estimator: ResourceEstimator,
) -> None:
    """Without max_tokens, max_completion_tokens and then the model's max_output_tokens apply."""
    messages = [{"role": "user", "content": "hello"}]
    given = estimator.shape_of(
        "llama-3-8b", Task.CHAT, {"messages": messages, "max_completion_tokens": 7}, None
    )
    default = estimator.shape_of("llama-3-8b", Task.CHAT, {"messages": messages}, None)
    assert given == Shape(1, 2 + 4 + 2, 7)
    assert default == Shape(1, 8, 256)


def test_default_output_is_cut_to_the_context_left(estimator: ResourceEstimator) -> None:
    """A prompt near the context gets the new tokens that still fit, not a rejection."""
    shape = estimator.shape_of("tinyllama-1.1b", Task.COMPLETION, {"prompt": "a" * 8000}, None)
    assert shape == Shape(1, 2000, 48)


@pytest.mark.parametrize(
    ("prompt", "batch", "tokens"),
    [
        ("abcdefghi", 1, 3),
        ("", 1, 0),
        (["ab", "abcdefghij"], 2, 3),
        ([1, 2, 3, 4, 5], 1, 5),
        ([[1, 2], [1, 2, 3]], 2, 3),
    ],
)
def test_completion_prompt_forms(
    estimator: ResourceEstimator, prompt: Any, batch: int, tokens: int
) -> None:
    """A prompt is a string, strings, token ids or token-id lists; the longest sets the tokens."""
    shape = estimator.shape_of(
        "tinyllama-1.1b", Task.COMPLETION, {"prompt": prompt, "max_tokens": 16}, None
    )
    assert shape == Shape(batch, tokens, 16)


def test_completion_n_multiplies_the_prompts(estimator: ResourceEstimator) -> None:
    """Two completions (n=2) of each of 2 prompts make a batch of 4."""
    shape = estimator.shape_of(
        "tinyllama-1.1b", Task.COMPLETION, {"prompt": ["ab", "cd"], "n": 2, "max_tokens": 1}, None
    )
    assert shape == Shape(4, 1, 1)


@pytest.mark.parametrize(
    ("value", "batch", "tokens"),
    [("a" * 41, 1, 11), (["a", "b" * 20, "c"], 3, 5), ([[7] * 30, [7]], 2, 30)],
)
def test_embedding_input_forms(
    estimator: ResourceEstimator, value: Any, batch: int, tokens: int
) -> None:
    """Embedding input takes the prompt forms and produces no new tokens."""
    shape = estimator.shape_of("all-minilm-l6-v2", Task.EMBEDDING, {"input": value}, None)
    assert shape == Shape(batch, tokens, 0)


def test_generic_shape_and_explicit_shapes(estimator: ResourceEstimator) -> None:
    """Generic work is Shape(1, 0, 0); an explicit shape wins over the input for any task."""
    assert estimator.shape_of("llama-3-8b", Task.GENERIC, {"anything": 1}, None) == Shape(1, 0, 0)
    explicit = Shape(3, 10, 20)
    counted = estimator.shape_of("llama-3-8b", Task.CHAT, {"messages": "ignored"}, explicit)
    assert counted == explicit


def test_context_overflow_names_the_model_and_its_context(estimator: ResourceEstimator) -> None:
    """Input plus output beyond max_context raises InvalidRequest on the field "shape"."""
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequest) as caught:
        estimator.shape_of(
            "llama-3-8b", Task.CHAT, {"messages": messages, "max_tokens": 8190}, None
        )
    assert caught.value.field == "shape"
    assert "llama-3-8b" in str(caught.value)
    assert "8192 tokens" in str(caught.value)
    with pytest.raises(InvalidRequest) as explicit:
        estimator.shape_of("tinyllama-1.1b", Task.COMPLETION, {}, Shape(1, 2000, 49))
    assert explicit.value.field == "shape"


@pytest.mark.parametrize(
    ("task", "body", "field"),
    [
        (Task.CHAT, {}, "input.messages"),
        (Task.CHAT, {"messages": "hello"}, "input.messages"),
        (Task.CHAT, {"messages": []}, "input.messages"),
        (Task.CHAT, {"messages": ["hello"]}, "input.messages[0]"),
        (Task.CHAT, {"messages": [{"content": "x"}]}, "input.messages[0].role"),
        (Task.CHAT, {"messages": [{"role": "user", "content": 5}]}, "input.messages[0].content"),
        (
            Task.CHAT,
            {"messages": [{"role": "user", "content": [{"text": 5}]}]},
            "input.messages[0].content[0].text",
        ),
        (Task.CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 0}, "input.n"),
        (Task.CHAT, {"messages": [{"role": "user", "content": "x"}], "n": True}, "input.n"),
        (
            Task.CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "input.max_tokens",
        ),
        (
            Task.CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "input.max_tokens",
        ),
        (
            Task.COMPLETION,
            {"prompt": "x", "max_completion_tokens": 0},
            "input.max_completion_tokens",
        ),
        (
            Task.CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"},
            "input.max_tokens",
        ),
        (
            Task.CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": True},
            "input.max_tokens",
        ),
        (
            Task.CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1.5},
            "input.max_completion_tokens",
        ),
        (Task.COMPLETION, {}, "input.prompt"),
        (Task.COMPLETION, {"prompt": []}, "input.prompt"),
        (Task.COMPLETION, {"prompt": [1, "a"]}, "input.prompt"),
        (Task.COMPLETION, {"prompt": [True, False]}, "input.prompt"),
        (Task.COMPLETION, {"prompt": [-1]}, "input.prompt"),
        (Task.EMBEDDING, {"input": 5}, "input.input"),
    ],
)
def test_malformed_input_names_the_field(
    estimator: ResourceEstimator, task: Task, body: dict[str, Any], field: str
) -> None:
    """Wrong types, counts below their minimum (max_tokens: 1) or booleans name the field."""
    with pytest.raises(InvalidRequest) as caught:
        estimator.shape_of("llama-3-8b", task, body, None)
    assert caught.value.field == field


def test_unknown_model_raises_unknown_model(estimator: ResourceEstimator) -> None:
    """Every entry point refuses a model that is not in the catalog and lists the known ones."""
    calls = [
        lambda: estimator.profile("gpt-9"),
        lambda: estimator.estimate("gpt-9", Shape()),
        lambda: estimator.shape_of("gpt-9", Task.GENERIC, {}, None),
        lambda: estimator.throughput("gpt-9", "H100-80GB"),
    ]
    for call in calls:
        with pytest.raises(UnknownModel) as caught:
            call()
        assert caught.value.model == "gpt-9"
        assert "llama-3-8b" in str(caught.value)


# --- throughput and duration ----------------------------------------------------------------


def test_duration_uses_the_catalog_throughput(estimator: ResourceEstimator) -> None:
    """On H100 llama-3-8b prefills 12000 tok/s and decodes 90; a batch decodes in parallel."""
    assert estimator.throughput("llama-3-8b", "H100-80GB") == (12000.0, 90.0)
    one = estimator.estimate("llama-3-8b", Shape(1, 1200, 90))
    four = estimator.estimate("llama-3-8b", Shape(4, 1200, 90))
    assert one.duration_s["H100-80GB"] == pytest.approx(1200 / 12000 + 90 / 90)
    assert four.duration_s["H100-80GB"] == pytest.approx(4 * 1200 / 12000 + 90 / 90)
    assert one.duration_s["L4-24GB"] == pytest.approx(1200 / 2500 + 90 / 25)


def test_estimates_cover_exactly_the_fleet_types(settings: Settings) -> None:
    """Durations are given for each GPU type of the fleet and no other."""
    fleet = {"H100-80GB": H100, "L4-24GB": L4}
    estimate = ResourceEstimator(settings.models, fleet).estimate("llama-3-8b", Shape(1, 10, 10))
    assert set(estimate.duration_s) == set(fleet)


def test_unlisted_type_scales_by_datasheet_ratios(estimator: ResourceEstimator) -> None:
    """A100 (unlisted) scales the first listed entry: prefill by TFLOPS, decode by bandwidth."""
    prefill, decode = estimator.throughput("llama-3-8b", "A100-80GB")
    assert prefill == pytest.approx(12000 * A100.tflops / H100.tflops)
    assert decode == pytest.approx(90 * A100.bandwidth_gbs / H100.bandwidth_gbs)
    assert estimator.throughput("llama-3-8b", "H200-141GB") == pytest.approx(
        (12000.0, 90 * 4800 / 3350)
    )
    estimate = estimator.estimate("llama-3-8b", Shape(1, 1200, 90))
    assert estimate.duration_s["A100-80GB"] == pytest.approx(1200 / prefill + 90 / decode)


def test_unknown_types_count_as_h100(settings: Settings) -> None:
    """A type with no figures anywhere, or a custom fleet type, gets H100 datasheet figures."""
    fleet = {"H100-80GB": H100, "MI300X": gpu_type("MI300X", 192000)}
    estimator = ResourceEstimator(settings.models, fleet)
    assert estimator.throughput("llama-3-8b", "MI300X") == pytest.approx((12000.0, 90.0))
    assert estimator.throughput("llama-3-8b", "Z9-1GB") == pytest.approx((12000.0, 90.0))


def test_scaling_skips_entries_of_unknown_types() -> None:
    """The first listed entry whose type has figures is the reference; none means roofline."""
    entries = {
        "Mystery-1": {"prefill_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0},
        "L4-24GB": {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 10.0},
    }
    models = {
        "scaled": ModelSpec(weights_mb=1000, throughput=entries),
        "orphan": ModelSpec(weights_mb=1000, throughput={"Mystery-1": entries["Mystery-1"]}),
    }
    estimator = ResourceEstimator(models, BUILTIN_GPU_TYPES)
    assert estimator.throughput("scaled", "H100-80GB") == pytest.approx(
        (1000 * 989 / 121, 10 * 3350 / 300)
    )
    weights = 1000 * MIB
    assert estimator.throughput("orphan", "H100-80GB") == pytest.approx(
        (0.4 * 989e12 / (2 * (weights // 2)), 0.6 * 3350e9 / weights)
    )


def test_roofline_for_a_model_without_throughput(estimator: ResourceEstimator) -> None:
    """TinyLlama has no catalog throughput: prefill 0.4 × FLOPS / 2P, decode 0.6 × BW / weights."""
    prefill, decode = estimator.throughput("tinyllama-1.1b", "H100-80GB")
    assert prefill == pytest.approx(0.4 * 989e12 / (2 * 1_100_048_384))
    assert decode == pytest.approx(0.6 * 3350e9 / 2_200_096_768)
    l4_prefill, l4_decode = estimator.throughput("tinyllama-1.1b", "L4-24GB")
    assert l4_prefill == pytest.approx(0.4 * 121e12 / (2 * 1_100_048_384))
    assert l4_decode == pytest.approx(0.6 * 300e9 / 2_200_096_768)
    estimate = estimator.estimate("tinyllama-1.1b", Shape(1, 500, 100))
    assert estimate.duration_s["H100-80GB"] == pytest.approx(500 / prefill + 100 / decode)


def test_an_empty_shape_takes_the_default_duration() -> None:
    """A request with no tokens lasts the model's default_duration_s on every type."""
    models = {"job": ModelSpec(task=Task.GENERIC, weights_mb=10, default_duration_s=7.5)}
    estimate = ResourceEstimator(models, BUILTIN_GPU_TYPES).estimate("job", Shape(1, 0, 0))
    assert estimate.duration_s == dict.fromkeys(BUILTIN_GPU_TYPES, 7.5)


# --- online learning -----------------------------------------------------------------------


def test_observe_moves_the_duration_factor_of_the_pair(estimator: ResourceEstimator) -> None:
    """Observing twice the estimate sets the factor to 0.8 × 1 + 0.2 × 2 for that type only."""
    shape = Shape(1, 1200, 90)
    first = estimator.estimate("llama-3-8b", shape)
    assert first.duration_s["H100-80GB"] == pytest.approx(1.1)
    estimator.observe("llama-3-8b", "H100-80GB", first, 2.2, None)
    second = estimator.estimate("llama-3-8b", shape)
    assert second.duration_s["H100-80GB"] == pytest.approx(1.1 * 1.2)
    assert second.duration_s["L4-24GB"] == pytest.approx(first.duration_s["L4-24GB"])
    estimator.observe("llama-3-8b", "H100-80GB", second, 2.2, None)
    third = estimator.estimate("llama-3-8b", shape)
    assert third.duration_s["H100-80GB"] == pytest.approx(1.1 * (0.8 * 1.2 + 0.2 * 2))


def test_observe_with_the_shape_is_exact_for_stale_estimates(
    estimator: ResourceEstimator,
) -> None:
    """Estimates issued before any learning each count as a ratio of 2 given the shape."""
    shape = Shape(1, 1200, 90)
    a = estimator.estimate("llama-3-8b", shape)
    b = estimator.estimate("llama-3-8b", shape)
    estimator.observe("llama-3-8b", "H100-80GB", a, 2.2, None, shape=shape)
    estimator.observe("llama-3-8b", "H100-80GB", b, 2.2, None, shape=shape)
    after = estimator.estimate("llama-3-8b", shape)
    assert after.duration_s["H100-80GB"] == pytest.approx(1.1 * (0.8 * 1.2 + 0.2 * 2))


def test_duration_factor_is_clamped(estimator: ResourceEstimator) -> None:
    """However far off the observations, the duration factor stays within [0.1, 10]."""
    shape = Shape(1, 1200, 90)
    for _ in range(50):
        estimator.observe(
            "llama-3-8b", "H100-80GB", estimator.estimate("llama-3-8b", shape), 1e6, None
        )
    high = estimator.estimate("llama-3-8b", shape).duration_s["H100-80GB"]
    assert high == pytest.approx(11.0)
    for _ in range(100):
        estimator.observe(
            "llama-3-8b", "H100-80GB", estimator.estimate("llama-3-8b", shape), 0.0, None
        )
    low = estimator.estimate("llama-3-8b", shape).duration_s["H100-80GB"]
    assert low == pytest.approx(0.11)


def test_observe_moves_the_memory_factor_on_the_non_weights_part(
    estimator: ResourceEstimator,
) -> None:
    """A peak with twice the estimated KV cache sets the memory factor to 1.2."""
    shape = Shape(1, 1000, 200)
    first = estimator.estimate("llama-3-8b", shape)
    assert (first.weights_mb, first.kv_cache_mb) == (15317, 150)
    estimator.observe("llama-3-8b", "H100-80GB", first, 1.0, 15317 + 300)
    second = estimator.estimate("llama-3-8b", shape)
    assert second.weights_mb == 15317
    assert second.kv_cache_mb == 180
    assert second.gpu_memory_mb == 15317 + 180


def test_memory_factor_is_clamped(estimator: ResourceEstimator) -> None:
    """The memory factor stays within [0.5, 4]."""
    shape = Shape(1, 1000, 200)
    for _ in range(60):
        estimate = estimator.estimate("llama-3-8b", shape)
        estimator.observe("llama-3-8b", "H100-80GB", estimate, 1.0, 80000)
    assert estimator.estimate("llama-3-8b", shape).kv_cache_mb == 600
    for _ in range(100):
        estimate = estimator.estimate("llama-3-8b", shape)
        estimator.observe("llama-3-8b", "H100-80GB", estimate, 1.0, 15317)
    assert estimator.estimate("llama-3-8b", shape).kv_cache_mb == 75


def test_hinted_requests_and_missing_peaks_do_not_teach_memory(
    estimator: ResourceEstimator,
) -> None:
    """A request with a memory hint, or no reported peak, leaves the memory factor alone."""
    shape = Shape(1, 1000, 200)
    hints = ResourceHints(gpu_memory_mb=20000)
    hinted = estimator.estimate("llama-3-8b", shape, hints)
    estimator.observe("llama-3-8b", "H100-80GB", hinted, 1.0, 19000, shape=shape, hints=hints)
    plain = estimator.estimate("llama-3-8b", shape)
    estimator.observe("llama-3-8b", "H100-80GB", plain, 1.0, None)
    assert estimator.estimate("llama-3-8b", shape).kv_cache_mb == 150
    assert ("llama-3-8b", "memory") not in estimator.error_ratios()


def test_error_ratios_are_ewmas_of_observed_over_estimated(estimator: ResourceEstimator) -> None:
    """The first observation sets each ratio; later ones blend in with weight 0.2."""
    assert estimator.error_ratios() == {}
    shape = Shape(1, 1000, 200)
    estimate = estimator.estimate("llama-3-8b", shape)
    h100 = estimate.duration_s["H100-80GB"]
    estimator.observe("llama-3-8b", "H100-80GB", estimate, 2 * h100, 15317 + 300)
    ratios = estimator.error_ratios()
    assert ratios[("llama-3-8b", "duration")] == pytest.approx(2.0)
    assert ratios[("llama-3-8b", "memory")] == pytest.approx((15317 + 300) / (15317 + 150))
    l4 = estimate.duration_s["L4-24GB"]
    estimator.observe("llama-3-8b", "L4-24GB", estimate, l4, None)
    assert estimator.error_ratios()[("llama-3-8b", "duration")] == pytest.approx(0.8 * 2 + 0.2)


def test_grow_after_oom_grows_by_the_factor(estimator: ResourceEstimator) -> None:
    """The grown estimate is ceil(old × growth), the extra in activations, the rest unchanged."""
    estimate = estimator.estimate("llama-3-8b", Shape(4, 2000, 48))
    grown = estimator.grow_after_oom("llama-3-8b", estimate, 1.5, None)
    assert grown.gpu_memory_mb == math.ceil(16341 * 1.5) == 24512
    assert grown.weights_mb == estimate.weights_mb
    assert grown.kv_cache_mb == estimate.kv_cache_mb
    assert grown.activations_mb == 24512 - 16341
    assert grown.duration_s == estimate.duration_s
    assert grown.gpu_count == estimate.gpu_count


def test_grow_after_oom_respects_a_reported_peak_and_always_grows(
    estimator: ResourceEstimator,
) -> None:
    """A larger reported peak wins, and the estimate always grows by at least 1 MiB."""
    estimate = estimator.estimate("llama-3-8b", Shape(4, 2000, 48))
    assert estimator.grow_after_oom("llama-3-8b", estimate, 1.5, 30000).gpu_memory_mb == 30000
    assert estimator.grow_after_oom("llama-3-8b", estimate, 1.5, 100).gpu_memory_mb == 24512
    small = Estimate(10, 5, 3, 2, {"H100-80GB": 1.0})
    assert estimator.grow_after_oom("llama-3-8b", small, 1.0, None).gpu_memory_mb == 11


def test_grow_after_oom_raises_the_memory_factor(estimator: ResourceEstimator) -> None:
    """After an OOM the next request of the same shape starts at the grown size."""
    shape = Shape(4, 2000, 48)
    estimate = estimator.estimate("llama-3-8b", shape)
    grown = estimator.grow_after_oom("llama-3-8b", estimate, 1.05, None)
    assert grown.gpu_memory_mb == 17159
    assert estimator.estimate("llama-3-8b", shape).gpu_memory_mb == 17159
    estimator.grow_after_oom("llama-3-8b", estimate, 1.01, None, shape=shape)
    assert estimator.estimate("llama-3-8b", shape).gpu_memory_mb == 17159
    estimator.grow_after_oom("llama-3-8b", estimate, 10.0, None, shape=shape)
    assert estimator.estimate("llama-3-8b", shape).kv_cache_mb == 4 * 1024


def test_grow_after_oom_of_a_hinted_request_keeps_the_factor(
    estimator: ResourceEstimator,
) -> None:
    """An OOM under a memory hint grows that estimate but teaches the model nothing."""
    shape = Shape(4, 2000, 48)
    hints = ResourceHints(gpu_memory_mb=16000)
    estimate = estimator.estimate("llama-3-8b", shape, hints)
    grown = estimator.grow_after_oom("llama-3-8b", estimate, 1.5, None, shape=shape, hints=hints)
    assert grown.gpu_memory_mb == 24000
    assert estimator.estimate("llama-3-8b", shape).gpu_memory_mb == 16341

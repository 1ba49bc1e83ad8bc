"""The estimator's activation terms pinned against the published shapes of real models.

Every shape below is copied from the model's Hugging Face ``config.json`` (URL beside it), and
every expected figure is worked out by hand in the test from those shapes and the formulas of
docs/architecture.md ("Activations and their sources"), never by calling the estimator's own
helpers. The last part checks that an estimate grown after an out-of-memory failure never falls
below the peak the failure reported, whatever the estimator learns afterwards.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_resource_estimator import tinyllama_architecture

from gpu_request_router.config import ModelSpec
from gpu_request_router.config.config_loader import Architecture
from gpu_request_router.core.resource_estimator import (
    OOM_FLOOR_ENTRIES,
    ResourceEstimator,
    profile_from_spec,
)
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.models.request import ResourceHints, Shape, Task

MIB = 2**20

# https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/blob/main/config.json
# (BertModel; hidden_size 384, intermediate_size 1536, 12 heads, 6 layers, vocab 30522,
# max_position_embeddings 512, type_vocab_size 2). Served in fp16 here, as in the issue.
MINILM: dict[str, Any] = {
    "kind": "encoder",
    "num_hidden_layers": 6,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "dtype": "float16",
}
# https://huggingface.co/google-bert/bert-base-uncased/blob/main/config.json
BERT_BASE: dict[str, Any] = {
    "kind": "encoder",
    "num_hidden_layers": 12,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "dtype": "float32",
}
# https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
# (hidden_size 896, intermediate_size 4864, 14 heads, 2 KV heads, 24 layers, vocab 151936,
# tie_word_embeddings true, torch_dtype bfloat16; head_dim = 896 / 14 = 64).
QWEN_05B: dict[str, Any] = {
    "num_hidden_layers": 24,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
}
# https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
# (hidden_size 4096, intermediate_size 14336, 32 heads, 8 KV heads, 32 layers, vocab 128256,
# torch_dtype bfloat16; head_dim = 4096 / 32 = 128).
LLAMA3_8B: dict[str, Any] = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "dtype": "bfloat16",
}


def spec(fields: dict[str, Any], task: Task = Task.CHAT, **changes: Any) -> ModelSpec:
    """A catalog entry described only by its architecture block."""
    return ModelSpec(
        task=task, max_context=32768, architecture=Architecture(**{**fields, **changes})
    )


def estimator_of(**models: ModelSpec) -> ResourceEstimator:
    """A fresh estimator over ``models`` and every built-in GPU type."""
    return ResourceEstimator(models, BUILTIN_GPU_TYPES)


# --- encoders ------------------------------------------------------------------------------


def test_bert_base_has_its_published_109_482_240_parameters() -> None:
    """Embeddings, 12 BERT layers with biases and LayerNorms, and the pooler: BertModel's count."""
    embeddings = (30522 + 512 + 2) * 768 + 2 * 768
    attention = 4 * (768 * 768 + 768) + 2 * 768
    feed_forward = 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * 768
    pooler = 768 * 768 + 768
    expected = embeddings + 12 * (attention + feed_forward) + pooler
    assert expected == 109_482_240
    profile = profile_from_spec("bert", spec(BERT_BASE, Task.EMBEDDING))
    assert profile.params == expected
    assert profile.weights_bytes == 4 * expected
    assert profile.kv_bytes_per_token == 0  # an encoder keeps no KV cache
    assert profile.logits_bytes_per_sequence == 0


def test_minilm_figures_with_sdpa_attention() -> None:
    """MiniLM-L6 in fp16: 22,713,216 parameters (44 MiB) and no score term under SDPA."""
    embeddings = (30522 + 512 + 2) * 384 + 2 * 384
    per_layer = 4 * (384 * 384 + 384) + 2 * 384 + 2 * 384 * 1536 + 1536 + 384 + 2 * 384
    expected_params = embeddings + 6 * per_layer + 384 * 384 + 384
    assert expected_params == 22_713_216
    profile = profile_from_spec("minilm", spec(MINILM, Task.EMBEDDING))
    assert profile.params == expected_params
    assert -(-profile.weights_bytes // MIB) == 44
    # Feed-forward stage: the layer input, the attention output, the dense and GELU outputs.
    assert profile.activation_bytes_per_token == 2 * (2 * 384 + 2 * 1536) == 7680
    # Attention stage: the layer input, Q, K, V, the context, and one fp32 statistic per head.
    assert profile.attention_bytes_per_token == 2 * (384 + 4 * 384) + 4 * 12 == 3888
    assert profile.score_bytes_per_pair == 0


def test_minilm_at_batch_512_by_512_tokens_sdpa_against_eager() -> None:
    """The issue's shape: SDPA needs 1,964 MiB; the L×L scores of eager attention 7,148 MiB."""
    estimator = estimator_of(
        sdpa=spec(MINILM, Task.EMBEDDING),
        eager=spec(MINILM, Task.EMBEDDING, attn_implementation="eager"),
    )
    shape = Shape(512, 512, 0)
    tokens = 512 * 512
    sdpa = estimator.estimate("sdpa", shape)
    assert sdpa.activations_mb == 7680 * tokens // MIB == 1920
    assert (sdpa.weights_mb, sdpa.kv_cache_mb, sdpa.gpu_memory_mb) == (44, 0, 1964)
    # Eager: 12 heads × 512 × 512 scores per sequence, each held as scores and probabilities
    # in fp16 (2 × 2 bytes), on top of the attention stage without the kernel's statistics.
    scores = 12 * 2 * 2 * 512 * 512 * 512
    eager = estimator.estimate("eager", shape)
    assert eager.activations_mb == (2 * (384 + 4 * 384) * tokens + scores) // MIB == 7104
    assert eager.gpu_memory_mb == 44 + 7104
    assert 3.6 < eager.gpu_memory_mb / sdpa.gpu_memory_mb < 3.7


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 64), prompt=st.integers(1, 512))
def test_sdpa_encoder_memory_is_linear_in_tokens(batch: int, prompt: int) -> None:
    """Without a score matrix, the activations of an encoder grow with batch × length only."""
    estimator = estimator_of(minilm=spec(MINILM, Task.EMBEDDING))
    activations = estimator.estimate("minilm", Shape(batch, prompt, 0)).activations_mb
    assert activations == -(-7680 * batch * prompt // MIB)


# --- a small decoder -----------------------------------------------------------------------


def test_qwen2_5_0_5b_figures() -> None:
    """Qwen2.5-0.5B (bf16, GQA 14:2, head dim 64): KV cache, both stages, logits, eager terms."""
    sdpa = profile_from_spec("qwen", spec(QWEN_05B))
    # 24 layers × (K + V) × 2 KV heads × 64 × 2 bytes.
    assert sdpa.kv_bytes_per_token == 24 * 2 * 2 * 64 * 2 == 12288
    # MLP stage: the residual stream twice and the normed input, gate·act, up and their product.
    assert sdpa.activation_bytes_per_token == 2 * (3 * 896 + 3 * 4864) == 34560
    # Attention stage: residual, normed input, Q and output (14 × 64), K and V (2 × 64).
    assert sdpa.attention_bytes_per_token == 2 * (2 * 896 + 2 * 896 + 2 * 128) + 4 * 14 == 7736
    assert sdpa.logits_bytes_per_sequence == 151936 * 4
    eager = profile_from_spec("qwen", spec(QWEN_05B, attn_implementation="eager"))
    # repeat_kv expands K and V to 14 heads; scores, the fp32 softmax and its bf16 cast.
    assert eager.attention_bytes_per_token == 2 * (2 * 896 + 2 * 896 + 2 * 128 + 2 * 896)
    assert eager.score_bytes_per_pair == 14 * (2 + 4 + 2) == 112


def test_qwen2_5_0_5b_prefill_of_8_by_4096_tokens() -> None:
    """8 sequences of 4,096 prompt + 512 new tokens: 432 MiB of KV, 1,085 MiB of activations."""
    estimator = estimator_of(sdpa=spec(QWEN_05B), eager=spec(QWEN_05B, attn_implementation="eager"))
    shape = Shape(8, 4096, 512)
    sdpa = estimator.estimate("sdpa", shape)
    assert sdpa.kv_cache_mb == 12288 * 8 * 4608 // MIB == 432
    # The MLP stage (34,560 B/token) exceeds the attention stage (7,736 B/token).
    assert sdpa.activations_mb == -(-(34560 * 8 * 4096 + 8 * 151936 * 4) // MIB) == 1085
    eager = estimator.estimate("eager", shape)
    assert eager.kv_cache_mb == 432
    scores = 112 * 8 * 4096 * 4096
    attention = 11264 * 8 * 4096 + scores
    assert eager.activations_mb == -(-(attention + 8 * 151936 * 4) // MIB) == 14693


# --- an 8B decoder -------------------------------------------------------------------------


def test_llama3_8b_figures() -> None:
    """Llama-3-8B (bf16, GQA 32:8, head dim 128): the published 131,072 KV bytes per token."""
    profile = profile_from_spec("llama", spec(LLAMA3_8B))
    assert profile.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131072
    assert profile.activation_bytes_per_token == 2 * (3 * 4096 + 3 * 14336) == 110592
    assert profile.attention_bytes_per_token == 2 * (2 * 4096 + 2 * 4096 + 2 * 1024) + 4 * 32
    assert profile.attention_bytes_per_token == 36992
    assert profile.score_bytes_per_pair == 0
    assert profile.logits_bytes_per_sequence == 128256 * 4 == 513024
    eager = profile_from_spec("llama", spec(LLAMA3_8B, attn_implementation="eager"))
    assert eager.attention_bytes_per_token == 2 * (2 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 4096)
    assert eager.score_bytes_per_pair == 32 * (2 + 4 + 2) == 256


def test_llama3_8b_one_sequence_of_8000_prompt_tokens() -> None:
    """B = 1, I = 8,000, O = 192: 15,317 + 1,024 + 845 MiB with SDPA; eager adds 15 GiB."""
    estimator = estimator_of(
        sdpa=spec(LLAMA3_8B), eager=spec(LLAMA3_8B, attn_implementation="eager")
    )
    shape = Shape(1, 8000, 192)
    sdpa = estimator.estimate("sdpa", shape)
    assert sdpa.weights_mb == -(-8_030_261_248 * 2 // MIB) == 15317
    assert sdpa.kv_cache_mb == 131072 * 8192 // MIB == 1024
    assert sdpa.activations_mb == -(-(110592 * 8000 + 513024) // MIB) == 845
    assert sdpa.gpu_memory_mb == 15317 + 1024 + 845
    eager = estimator.estimate("eager", shape)
    attention = 53248 * 8000 + 256 * 8000 * 8000
    assert eager.activations_mb == -(-(attention + 513024) // MIB) == 16032


def test_an_explicit_activation_figure_replaces_every_derived_term() -> None:
    """activation_bytes_per_token beside an eager architecture: only that figure counts."""
    explicit = ModelSpec(
        max_context=32768,
        activation_bytes_per_token=1000,
        architecture=Architecture(**{**LLAMA3_8B, "attn_implementation": "eager"}),
    )
    estimate = estimator_of(llama=explicit).estimate("llama", Shape(1, 8000, 0))
    assert estimate.activations_mb == -(-(1000 * 8000 + 513024) // MIB) == 9


# --- out-of-memory growth never falls below the observed peak -------------------------------

_SHAPES = st.builds(Shape, st.integers(1, 16), st.integers(0, 4000), st.integers(0, 1000))


def tinyllama() -> ModelSpec:
    """TinyLlama-1.1B, whose estimates have KV cache and activations."""
    return ModelSpec(task=Task.COMPLETION, max_context=32768, architecture=tinyllama_architecture())


def test_small_peaks_after_an_oom_do_not_shrink_the_estimate_below_its_peak() -> None:
    """Twenty executions that used only their weights leave the failed shape at its peak."""
    estimator = estimator_of(tiny=tinyllama())
    shape = Shape(4, 2000, 100)
    estimate = estimator.estimate("tiny", shape)
    peak = estimate.gpu_memory_mb + 3000
    estimator.grow_after_oom("tiny", estimate, 1.5, peak, shape=shape)
    for _ in range(20):
        current = estimator.estimate("tiny", shape)
        estimator.observe("tiny", "H100-80GB", current, 1.0, current.weights_mb, shape=shape)
    assert estimator.estimate("tiny", shape).gpu_memory_mb >= peak


def test_a_floor_is_exact_shape_and_a_hinted_failure_sets_none() -> None:
    """An OOM floor leaves other shapes and GPU counts as learned; hinted failures set none."""
    estimator = estimator_of(tiny=tinyllama())
    shape, other = Shape(4, 2000, 100), Shape(4, 2001, 100)
    estimate = estimator.estimate("tiny", shape)
    peak = estimate.gpu_memory_mb + 50_000  # far beyond what the factor (capped at 4) can give
    estimator.grow_after_oom("tiny", estimate, 1.5, peak, shape=shape)
    assert estimator.estimate("tiny", shape).gpu_memory_mb == peak
    assert estimator.estimate("tiny", other).gpu_memory_mb < peak - 40_000
    two = ResourceHints(gpu_count=2)
    assert estimator.estimate("tiny", shape, two).gpu_memory_mb < peak - 40_000
    hinted = ResourceHints(gpu_memory_mb=3000)
    hinted_estimate = estimator.estimate("tiny", other, hinted)
    estimator.grow_after_oom("tiny", hinted_estimate, 1.5, 90_000, shape=other, hints=hinted)
    assert estimator.estimate("tiny", other).gpu_memory_mb < 90_000


def test_the_floors_kept_are_bounded_and_the_oldest_goes_first() -> None:
    """Past OOM_FLOOR_ENTRIES failed shapes, the oldest shape's floor is dropped, no other."""
    estimator = estimator_of(tiny=tinyllama())
    estimate = estimator.estimate("tiny", Shape(1, 1, 0))
    peak = estimate.gpu_memory_mb + 100_000
    for batch in range(1, OOM_FLOOR_ENTRIES + 2):
        estimator.grow_after_oom("tiny", estimate, 1.0, peak, shape=Shape(batch, 1, 0))
    assert estimator.estimate("tiny", Shape(1, 1, 0)).gpu_memory_mb < peak
    assert estimator.estimate("tiny", Shape(2, 1, 0)).gpu_memory_mb == peak
    assert estimator.estimate("tiny", Shape(OOM_FLOOR_ENTRIES + 1, 1, 0)).gpu_memory_mb == peak


def test_a_peak_beyond_the_factor_bound_still_holds() -> None:
    """A peak 10× the working memory needs a factor past the upper bound of 4; it gets it."""
    estimator = estimator_of(tiny=tinyllama())
    shape = Shape(1, 1000, 0)
    estimate = estimator.estimate("tiny", shape)
    peak = estimate.weights_mb + 10 * (estimate.kv_cache_mb + estimate.activations_mb)
    estimator.grow_after_oom("tiny", estimate, 1.5, peak, shape=shape)
    assert estimator.estimate("tiny", shape).gpu_memory_mb >= peak


_EVENTS = st.lists(
    st.tuples(st.booleans(), _SHAPES, st.floats(0.0, 3.0), st.integers(1, 3)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(events=_EVENTS)
def test_no_estimate_of_a_failed_shape_falls_below_its_peak(
    events: list[tuple[bool, Shape, float, int]],
) -> None:
    """Any mix of OOMs (peak above the estimate) and observations (any peak), on 1 to 3 GPUs."""
    estimator = estimator_of(tiny=tinyllama())
    failed: list[tuple[Shape, int, int]] = []
    for oom, shape, scale, gpus in events:
        hints = ResourceHints(gpu_count=gpus)
        estimate = estimator.estimate("tiny", shape, hints)
        working = estimate.gpu_memory_mb - estimate.weights_mb
        peak = estimate.weights_mb + round(working * scale)
        if oom:
            peak = max(peak, estimate.gpu_memory_mb + 1)
            estimator.grow_after_oom("tiny", estimate, 1.5, peak, shape=shape, hints=hints)
            failed.append((shape, gpus, peak))
        else:
            estimator.observe("tiny", "H100-80GB", estimate, 1.0, peak, shape=shape, hints=hints)
        for old_shape, old_gpus, old_peak in failed:
            again = estimator.estimate("tiny", old_shape, ResourceHints(gpu_count=old_gpus))
            assert again.gpu_memory_mb >= old_peak

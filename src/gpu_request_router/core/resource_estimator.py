"""Resource estimation: a request's peak GPU memory per GPU and its duration per GPU type.

Pure computation (no I/O, no clock). Sizes are bytes internally; the MiB fields of
:class:`~gpu_request_router.models.request.Estimate` are ``2**20`` bytes, rounded up.

Model figures (:func:`profile_from_spec`), with ``b`` the bytes of the dtype (float32 4,
float16/bfloat16 2, float8/int8 1) and the ``architecture`` block's L layers, hidden size h,
intermediate size i, nh attention heads, nkv KV heads (default nh), head dim hd (default h // nh),
vocabulary V, a = nh*hd, k = nkv*hd. Decoders (Llama family: RMSNorm, gated MLP, no biases)::

    params           = V*h + L*(h*a + 2*h*k + a*h + 3*h*i + 2*h) + h
                       + (0 if tie_word_embeddings else V*h)
    kv per token     = L * k * 2 * b
    attn. per token  = b*(2*h + 2*a + 2*k) + 4*nh         sdpa / flash_attention_2
                     = b*(2*h + 2*a + 2*k + 2*a)          eager (repeat_kv), 2*a only if nkv < nh
    other per token  = b*(3*h + 3*i)                      (the MLP stage)
    scores per pair  = nh * (2*b + 4)  eager only         (scores, fp32 softmax, its cast)
    logits per seq.  = V * 4                              (fp32 logits, last position)

Encoders (BERT family: LayerNorm, biases, GELU MLP, learned positions P and token types T)::

    params           = V*h + P*h + T*h + 2*h
                       + L*(h*a + a + 2*(h*k + k) + a*h + h + 2*h*i + i + h + 4*h) + h*h + h
    kv per token     = 0;  logits = 0
    attn. per token  = b*(h + 2*a + 2*k) + 4*nh           sdpa / flash_attention_2
                     = b*(h + 2*a + 2*k)                  eager
    other per token  = b * max(2*h + 2*i, 5*h + i)        (feed-forward, output sublayer)
    scores per pair  = nh * 2*b  eager only               (scores, softmax in the dtype)

Weights = params * b. Without an architecture: weights = weights_mb MiB, params = weights // 2
(16-bit weights), the per-token figures as given (default 0), attention and logits 0. An
explicit catalog figure wins over a derived one; an explicit activation figure replaces all of
the derived activation terms.

Memory of a request of shape (batch B, input I, output O) on g GPUs (tensor parallel splits
everything evenly), with m the model's learned memory factor (starts at 1), n = B * max(I, 1)::

    weights_mb     = ceil(weights / g)
    kv_cache_mb    = ceil(m * kv_per_token * B * (I + O) / g)
    activations    = max(other * n, attn * n + scores * B * I**2) + logits * B
    activations_mb = ceil(m * activations / g)
    gpu_memory_mb  = weights_mb + kv_cache_mb + activations_mb

A memory hint H (per GPU) replaces the total with ``max(H, weights_mb)``; the non-weights part
is split between KV cache and activations in proportion to the computed figures (all of it to
activations when both are 0).

Duration on GPU type t, with (P, D) = :meth:`ResourceEstimator.throughput` in tokens/s and
f the learned duration factor of (model, t, shape bucket) (below; starts at 1)::

    duration = f * (B * I / P + O / D)      (sequences of a batch decode in parallel)
    duration = f * default_duration_s       when I + O == 0

Throughput on t: the catalog entry for t; else the first catalog entry whose type has known
figures (the fleet's types, then :data:`BUILTIN_GPU_TYPES`), scaled by tflops(t)/tflops(r) for
prefill and bandwidth(t)/bandwidth(r) for decode; else a roofline,
``P = PREFILL_EFFICIENCY * tflops * 1e12 / (2 * params)`` and
``D = DECODE_EFFICIENCY * bandwidth_gbs * 1e9 / weights``. A type known nowhere gets H100 figures.

Online learning (EWMA with ``EWMA_ALPHA``), from :meth:`ResourceEstimator.observe`:

* duration factors, with ``s = observed / uncorrected`` (``uncorrected`` the estimate without
  any factor) and ``clamp`` to ``DURATION_FACTOR_BOUNDS``:

  - of (model, t): ``F <- clamp((1 - a) * F + a * s)``;
  - of (model, t, bucket), the shape bucket ``(bit_length(B * I), bit_length(O))`` (log2 of
    the prefill and the decode tokens, rounded down, plus one; 0 for none):
    ``f <- clamp((1 - a) * f + a * s)``, where a bucket not yet learned starts from F (before
    this sample), not from 1. An estimate uses f of its shape's bucket, else F, else 1. The
    ``DURATION_BUCKET_ENTRIES`` most recently observed buckets are kept (the least recently
    observed goes first); an evicted bucket starts again from F.

  A caller that does not pass the shape teaches F only, from ``issued / F``;
* memory factors, with ``s = (peak - weights_mb) / uncorrected`` (``uncorrected`` the
  non-weights MiB per GPU without any factor) and ``clamp`` to ``MEMORY_FACTOR_BOUNDS``: of the
  model, ``M <- clamp((1 - a) * M + a * s)``; of (model, shape bucket),
  ``m <- clamp((1 - a) * m + a * s)``, a bucket not yet learned starting from M. An estimate
  uses m of its shape's bucket, else M, else 1; the ``MEMORY_BUCKET_ENTRIES`` most recently
  observed buckets are kept. Requests with a memory hint do not teach them; a caller that does
  not pass the shape teaches M only.
* out-of-memory floors: :meth:`grow_after_oom` of an unhinted request with its shape and a
  reported peak P records P for (model, shape, GPU count); every later unhinted estimate of that
  key is at least P (the difference goes to activations), however M and m move. The
  ``OOM_FLOOR_ENTRIES`` most recently failed keys are kept.

The uncorrected figures are recomputed from the request's shape when the caller passes it;
otherwise they are the estimate divided by the model's factor in force now (which overshoots
when many requests estimated under an older factor report at once; without the shape the
bucket is unknown).

:meth:`ResourceEstimator.error_ratios` reports, per model, the EWMA (first sample as the start)
of observed / estimated *as issued*: ``"duration"`` over all GPU types of the model together,
``"memory"`` of peak / gpu_memory_mb. Both tend to 1 as the factors converge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar, assert_never

from gpu_request_router.config.config_loader import Architecture, ModelSpec
from gpu_request_router.exceptions import ContextLengthExceeded, InvalidRequest, UnknownModel
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES, GPUType, gpu_type
from gpu_request_router.models.request import Estimate, ResourceHints, Shape, Task

_K = TypeVar("_K")
_V = TypeVar("_V")

__all__ = [
    "CHARS_PER_TOKEN",
    "DECODE_EFFICIENCY",
    "DTYPE_BYTES",
    "DURATION_BUCKET_ENTRIES",
    "DURATION_FACTOR_BOUNDS",
    "EWMA_ALPHA",
    "MEMORY_BUCKET_ENTRIES",
    "MEMORY_FACTOR_BOUNDS",
    "OOM_FLOOR_ENTRIES",
    "PREFILL_EFFICIENCY",
    "ModelProfile",
    "ResourceEstimator",
    "profile_from_spec",
    "shape_bucket",
]

DTYPE_BYTES: Final[Mapping[str, int]] = MappingProxyType(
    {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1}
)
CHARS_PER_TOKEN: Final = 4  # text is counted as one token per 4 characters, rounded up
PREFILL_EFFICIENCY: Final = 0.4  # share of the datasheet tensor FLOPS prefill reaches
DECODE_EFFICIENCY: Final = 0.6  # share of the datasheet memory bandwidth decode reaches
EWMA_ALPHA: Final = 0.2  # weight of the newest observation in every learned average
DURATION_FACTOR_BOUNDS: Final = (0.1, 10.0)
DURATION_BUCKET_ENTRIES: Final = 4096  # (model, GPU type, shape bucket) duration factors kept
MEMORY_FACTOR_BOUNDS: Final = (0.5, 4.0)
MEMORY_BUCKET_ENTRIES: Final = 4096  # (model, shape bucket) memory factors kept
OOM_FLOOR_ENTRIES: Final = 4096  # failed (model, shape, GPU count) keys whose peaks are kept

_MIB: Final = 2**20
_MESSAGE_OVERHEAD_TOKENS: Final = 4  # role and separators of one chat message
_REPLY_PRIMING_TOKENS: Final = 2  # the assistant header the reply starts with
_FP32_BYTES: Final = 4  # logits, the fused kernels' softmax statistics, eager's fp32 softmax
_PROMPT_FORMS: Final = "must be a string or a non-empty list of strings, token ids or id lists"
_NO_HINTS: Final = ResourceHints()


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """The derived figures of one catalog model that estimates are computed from.

    Activations per layer stage (module docstring): ``activation_bytes_per_token`` is the
    largest stage other than attention (or the catalog's figure), ``attention_bytes_per_token``
    the attention stage's per-token tensors and ``score_bytes_per_pair`` its bytes per (query,
    key) pair, non-zero only for eager attention, which holds the score matrix.
    """

    name: str
    task: Task
    weights_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    logits_bytes_per_sequence: int
    params: int
    max_context: int
    max_output_tokens: int
    default_duration_s: float
    throughput: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    attention_bytes_per_token: int = 0
    score_bytes_per_pair: int = 0


class _Derived(NamedTuple):
    params: int
    weights_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int
    attention_bytes_per_token: int
    score_bytes_per_pair: int
    logits_bytes_per_sequence: int


def _derive(arch: Architecture) -> _Derived:
    """The figures of a transformer described by Hugging Face config fields (module docstring)."""
    layers, h, i = arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size
    nh = arch.num_attention_heads
    nkv = arch.num_key_value_heads or nh
    hd = arch.head_dim or h // nh
    a, k = nh * hd, nkv * hd
    vocab = arch.vocab_size
    b = DTYPE_BYTES[arch.dtype]
    eager = arch.attn_implementation == "eager"
    kernel_stats = 0 if eager else _FP32_BYTES * nh
    if arch.kind == "encoder":
        embeddings = (vocab + arch.max_position_embeddings + arch.type_vocab_size) * h + 2 * h
        per_layer = h * a + a + 2 * (h * k + k) + a * h + h + 2 * h * i + i + h + 4 * h
        params = embeddings + layers * per_layer + h * h + h
        return _Derived(
            params=params,
            weights_bytes=params * b,
            kv_bytes_per_token=0,
            activation_bytes_per_token=b * max(2 * h + 2 * i, 5 * h + i),
            attention_bytes_per_token=b * (h + 2 * a + 2 * k) + kernel_stats,
            score_bytes_per_pair=nh * 2 * b if eager else 0,
            logits_bytes_per_sequence=0,
        )
    per_layer = h * a + 2 * h * k + a * h + 3 * h * i + 2 * h
    params = vocab * h + layers * per_layer + h + (0 if arch.tie_word_embeddings else vocab * h)
    repeated_kv = 2 * a if eager and nkv < nh else 0
    return _Derived(
        params=params,
        weights_bytes=params * b,
        kv_bytes_per_token=layers * k * 2 * b,
        activation_bytes_per_token=b * (3 * h + 3 * i),
        attention_bytes_per_token=b * (2 * h + 2 * a + 2 * k + repeated_kv) + kernel_stats,
        score_bytes_per_pair=nh * (2 * b + _FP32_BYTES) if eager else 0,
        logits_bytes_per_sequence=vocab * _FP32_BYTES,
    )


def profile_from_spec(name: str, spec: ModelSpec) -> ModelProfile:
    """Derive the profile of catalog model ``name``; explicit catalog figures win over derived."""
    derived = _derive(spec.architecture) if spec.architecture is not None else None
    if spec.weights_mb is not None:
        weights_bytes = spec.weights_mb * _MIB
    elif derived is not None:
        weights_bytes = derived.weights_bytes
    else:  # ModelSpec's own validation forbids this
        raise ValueError(f"model {name}: give weights_mb or an architecture block")
    kv = spec.kv_bytes_per_token
    activation = spec.activation_bytes_per_token
    # An explicit activation figure replaces every derived activation term.
    attention = derived if derived is not None and activation is None else None
    return ModelProfile(
        name=name,
        task=spec.task,
        weights_bytes=weights_bytes,
        kv_bytes_per_token=kv if kv is not None else (derived.kv_bytes_per_token if derived else 0),
        activation_bytes_per_token=(
            activation
            if activation is not None
            else (derived.activation_bytes_per_token if derived else 0)
        ),
        attention_bytes_per_token=attention.attention_bytes_per_token if attention else 0,
        score_bytes_per_pair=attention.score_bytes_per_pair if attention else 0,
        logits_bytes_per_sequence=derived.logits_bytes_per_sequence if derived else 0,
        params=derived.params if derived else weights_bytes // 2,
        max_context=spec.max_context,
        max_output_tokens=spec.max_output_tokens,
        default_duration_s=spec.default_duration_s,
        throughput=MappingProxyType(
            {
                gpu: (figures.prefill_tokens_per_s, figures.decode_tokens_per_s)
                for gpu, figures in spec.throughput.items()
            }
        ),
    )


class ResourceEstimator:
    """Estimates requests' memory and duration from the model catalog and learns from outcomes."""

    def __init__(self, models: Mapping[str, ModelSpec], gpu_types: Mapping[str, GPUType]) -> None:
        self._profiles = {name: profile_from_spec(name, spec) for name, spec in models.items()}
        self._gpu_types = dict(gpu_types)
        self._duration_factors: dict[tuple[str, str], float] = {}
        # (model, GPU type, shape bucket) -> factor; insertion order is recency of observation,
        # the least recently observed goes first past DURATION_BUCKET_ENTRIES.
        self._duration_buckets: dict[tuple[str, str, tuple[int, int]], float] = {}
        self._memory_factors: dict[str, float] = {}
        # (model, shape bucket) -> factor; recency as for the duration buckets.
        self._memory_buckets: dict[tuple[str, tuple[int, int]], float] = {}
        # (model, shape, GPU count) -> peak MiB per GPU of an out-of-memory failure; insertion
        # order is recency, the oldest key goes first past OOM_FLOOR_ENTRIES.
        self._oom_floors: dict[tuple[str, Shape, int], int] = {}
        self._errors: dict[tuple[str, str], float] = {}

    def profile(self, model: str) -> ModelProfile:
        """The profile of ``model``; raises :class:`UnknownModel` when it is not in the catalog."""
        found = self._profiles.get(model)
        if found is None:
            raise UnknownModel(model, list(self._profiles))
        return found

    def shape_of(
        self, model: str, task: Task, input: Mapping[str, Any], shape: Shape | None
    ) -> Shape:
        """The shape of a request: ``shape`` when given, else counted from ``input``."""
        profile = self.profile(model)
        result = _checked_shape(shape) if shape is not None else _count(profile, task, input)
        total = result.input_tokens + result.output_tokens
        if total > profile.max_context:
            raise ContextLengthExceeded(
                "shape",
                f"{total} tokens ({result.input_tokens} input + {result.output_tokens} output) "
                f"exceeds the context of model {model} ({profile.max_context} tokens)",
            )
        return result

    def estimate(self, model: str, shape: Shape, hints: ResourceHints = _NO_HINTS) -> Estimate:
        """Peak memory per GPU and duration on every GPU type of the fleet, learning applied."""
        profile = self.profile(model)
        _checked_shape(shape)
        gpus = _checked_int(hints.gpu_count, "resources.gpu_count", 1)
        hint = hints.gpu_memory_mb
        if hint is not None:
            _checked_int(hint, "resources.gpu_memory_mb", 1)
        kv_bytes, activation_bytes = _working_bytes(profile, shape)
        bucket = shape_bucket(shape)
        factor = self.memory_factor(model, bucket)
        per_gpu = gpus * _MIB
        weights_mb = _ceil_div(profile.weights_bytes, per_gpu)
        kv_mb = _ceil_div(_scaled(kv_bytes, factor), per_gpu)
        activations_mb = _ceil_div(_scaled(activation_bytes, factor), per_gpu)
        if hint is not None:
            rest = max(hint, weights_mb) - weights_mb
            working = kv_mb + activations_mb
            kv_mb = rest * kv_mb // working if working else 0
            activations_mb = rest - kv_mb
        else:
            floor = self._oom_floors.get((model, shape, gpus), 0)
            activations_mb += max(floor - weights_mb - kv_mb - activations_mb, 0)
        durations = {
            gpu: self.duration_factor(model, gpu, bucket)
            * self._uncorrected_duration(profile, gpu, shape)
            for gpu in self._gpu_types
        }
        return Estimate(
            gpu_memory_mb=weights_mb + kv_mb + activations_mb,
            weights_mb=weights_mb,
            kv_cache_mb=kv_mb,
            activations_mb=activations_mb,
            duration_s=durations,
            gpu_count=gpus,
        )

    def duration_factor(self, model: str, gpu_type: str, bucket: tuple[int, int]) -> float:
        """The learned duration factor of ``model`` on ``gpu_type`` for shapes of ``bucket``.

        The bucket's own factor, else the factor of (model, GPU type), else 1 (module docstring).
        """
        found = self._duration_buckets.get((model, gpu_type, bucket))
        if found is not None:
            return found
        return self._duration_factors.get((model, gpu_type), 1.0)

    def memory_factor(self, model: str, bucket: tuple[int, int]) -> float:
        """The learned memory factor of ``model`` for shapes of ``bucket``.

        The bucket's own factor, else the model's, else 1 (module docstring).
        """
        found = self._memory_buckets.get((model, bucket))
        if found is not None:
            return found
        return self._memory_factors.get(model, 1.0)

    def throughput(self, model: str, gpu_type: str) -> tuple[float, float]:
        """(prefill, decode) tokens/s of ``model`` on ``gpu_type``: catalog, scaled, or roofline."""
        return self._throughput(self.profile(model), gpu_type)

    def grow_after_oom(
        self,
        model: str,
        estimate: Estimate,
        growth: float,
        peak_memory_mb: int | None,
        *,
        shape: Shape | None = None,
        hints: ResourceHints | None = None,
    ) -> Estimate:
        """The estimate after an out-of-memory failure, grown; the model's memory factor follows.

        The new ``gpu_memory_mb`` is ``max(ceil(old * growth), peak_memory_mb, old + 1)``, the
        extra going to ``activations_mb``. Unless ``hints`` carry a memory hint, the model's
        memory factor, and given ``shape`` its bucket's, rise (never fall) so that the same shape
        would now get as much, and ``peak_memory_mb``, given ``shape``, becomes a floor of every
        later estimate of this model, shape and GPU count.
        """
        profile = self.profile(model)
        old = estimate.gpu_memory_mb
        new = max(math.ceil(old * growth), peak_memory_mb or 0, old + 1)
        grown = Estimate(
            gpu_memory_mb=new,
            weights_mb=estimate.weights_mb,
            kv_cache_mb=estimate.kv_cache_mb,
            activations_mb=estimate.activations_mb + new - old,
            duration_s=dict(estimate.duration_s),
            gpu_count=estimate.gpu_count,
        )
        if hints is None or hints.gpu_memory_mb is None:
            if shape is not None and peak_memory_mb is not None:
                self._record_oom_floor((model, shape, estimate.gpu_count), peak_memory_mb)
            base = self._uncorrected_working_mb(profile, estimate, shape)
            if base > 0:
                factor = self._memory_factors.get(model, 1.0)
                target = (new - estimate.weights_mb) / base
                if shape is not None:
                    _renew(
                        self._memory_buckets,
                        (model, shape_bucket(shape)),
                        factor,
                        lambda prior: _clamp(max(prior, target), MEMORY_FACTOR_BOUNDS),
                        MEMORY_BUCKET_ENTRIES,
                    )
                self._memory_factors[model] = _clamp(max(factor, target), MEMORY_FACTOR_BOUNDS)
        return grown

    def observe(
        self,
        model: str,
        gpu_type: str,
        estimate: Estimate,
        duration_s: float,
        peak_memory_mb: int | None,
        *,
        shape: Shape | None = None,
        hints: ResourceHints | None = None,
    ) -> None:
        """Learn from a finished execution: its duration on ``gpu_type`` and its peak memory.

        ``peak_memory_mb`` is the peak on one GPU, weights included. Pass the request's
        ``shape`` for exact learning, and its ``hints``: a memory hint stops memory learning.
        """
        profile = self.profile(model)
        issued = estimate.duration_s.get(gpu_type)
        if math.isfinite(duration_s) and duration_s >= 0:
            key = (model, gpu_type)
            factor = self._duration_factors.get(key, 1.0)
            if shape is not None:
                base = self._uncorrected_duration(profile, gpu_type, shape)
            else:
                base = issued / factor if issued is not None else 0.0
            if base > 0:
                sample = duration_s / base
                if shape is not None:
                    _renew(
                        self._duration_buckets,
                        (model, gpu_type, shape_bucket(shape)),
                        factor,
                        lambda prior: _ewma(prior, sample, DURATION_FACTOR_BOUNDS),
                        DURATION_BUCKET_ENTRIES,
                    )
                self._duration_factors[key] = _ewma(factor, sample, DURATION_FACTOR_BOUNDS)
            if issued is not None and issued > 0:
                self._record_error(model, "duration", duration_s / issued)
        hinted = hints is not None and hints.gpu_memory_mb is not None
        if peak_memory_mb is None or hinted or peak_memory_mb <= 0:
            return  # no peak measured: a real one holds the weights at least
        base_mb = self._uncorrected_working_mb(profile, estimate, shape)
        if base_mb > 0:
            factor = self._memory_factors.get(model, 1.0)
            sample = max(peak_memory_mb - estimate.weights_mb, 0) / base_mb
            if shape is not None:
                _renew(
                    self._memory_buckets,
                    (model, shape_bucket(shape)),
                    factor,
                    lambda prior: _ewma(prior, sample, MEMORY_FACTOR_BOUNDS),
                    MEMORY_BUCKET_ENTRIES,
                )
            self._memory_factors[model] = _ewma(factor, sample, MEMORY_FACTOR_BOUNDS)
        if estimate.gpu_memory_mb > 0:
            self._record_error(model, "memory", peak_memory_mb / estimate.gpu_memory_mb)

    def error_ratios(self) -> dict[tuple[str, str], float]:
        """(model, "duration" | "memory") -> EWMA of observed / estimated, as issued."""
        return dict(self._errors)

    def bucket_counts(self) -> tuple[int, int]:
        """How many (duration, memory) bucket factors are kept now."""
        return len(self._duration_buckets), len(self._memory_buckets)

    def _record_oom_floor(self, key: tuple[str, Shape, int], peak_mb: int) -> None:
        _renew(self._oom_floors, key, 0, lambda floor: max(floor, peak_mb), OOM_FLOOR_ENTRIES)

    def _record_error(self, model: str, kind: str, ratio: float) -> None:
        key = (model, kind)
        previous = self._errors.get(key)
        self._errors[key] = (
            ratio if previous is None else (1 - EWMA_ALPHA) * previous + EWMA_ALPHA * ratio
        )

    def _uncorrected_working_mb(
        self, profile: ModelProfile, estimate: Estimate, shape: Shape | None
    ) -> float:
        """Non-weights MiB per GPU of ``estimate`` without the learned memory factor."""
        if shape is not None:
            kv_bytes, activation_bytes = _working_bytes(profile, shape)
            return (kv_bytes + activation_bytes) / (max(estimate.gpu_count, 1) * _MIB)
        factor = self._memory_factors.get(profile.name, 1.0)
        return (estimate.kv_cache_mb + estimate.activations_mb) / factor

    def _uncorrected_duration(self, profile: ModelProfile, gpu: str, shape: Shape) -> float:
        if shape.input_tokens + shape.output_tokens == 0:
            return profile.default_duration_s
        prefill, decode = self._throughput(profile, gpu)
        return shape.batch_size * shape.input_tokens / prefill + shape.output_tokens / decode

    def _throughput(self, profile: ModelProfile, gpu: str) -> tuple[float, float]:
        listed = profile.throughput.get(gpu)
        if listed is not None:
            return listed
        target = self._figures(gpu) or gpu_type(gpu, memory_mb=0)  # unknown: H100 figures
        for reference_name, (prefill, decode) in profile.throughput.items():
            reference = self._figures(reference_name)
            if reference is None or reference.tflops <= 0 or reference.bandwidth_gbs <= 0:
                continue
            return (
                prefill * target.tflops / reference.tflops,
                decode * target.bandwidth_gbs / reference.bandwidth_gbs,
            )
        return (
            PREFILL_EFFICIENCY * target.tflops * 1e12 / (2 * max(profile.params, 1)),
            DECODE_EFFICIENCY * target.bandwidth_gbs * 1e9 / max(profile.weights_bytes, 1),
        )

    def _figures(self, gpu: str) -> GPUType | None:
        return self._gpu_types.get(gpu) or BUILTIN_GPU_TYPES.get(gpu)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _scaled(size: int, factor: float) -> int:
    """``size * factor`` to the nearest byte (exact when the factor is 1)."""
    return size if factor == 1.0 else round(size * factor)


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _renew(
    recent_last: dict[_K, _V], key: _K, missing: _V, step: Callable[[_V], _V], entries: int
) -> None:
    """Set ``key`` to ``step`` of its value (``missing`` if none) as the most recent entry.

    The entry is taken out and put back, so the dict stays in order of use; past ``entries``
    the least recently used go (:func:`_bound`).
    """
    recent_last[key] = step(recent_last.pop(key, missing))
    _bound(recent_last, entries)


def _bound(recent_last: dict[Any, Any], entries: int) -> None:
    """Drop the least recent keys (the first inserted) past ``entries``."""
    while len(recent_last) > entries:
        del recent_last[next(iter(recent_last))]


def _ewma(average: float, sample: float, bounds: tuple[float, float]) -> float:
    """One EWMA step with weight ``EWMA_ALPHA`` on ``sample``, clamped to ``bounds``."""
    return _clamp((1 - EWMA_ALPHA) * average + EWMA_ALPHA * sample, bounds)


def shape_bucket(shape: Shape) -> tuple[int, int]:
    """The learning bucket of ``shape``: bit lengths of its prefill and decode tokens.

    ``(bit_length(batch_size * input_tokens), bit_length(output_tokens))``: 0 for no tokens,
    then one bucket per power of two (1, 2–3, 4–7, ...).
    """
    return (shape.batch_size * shape.input_tokens).bit_length(), shape.output_tokens.bit_length()


def _working_bytes(profile: ModelProfile, shape: Shape) -> tuple[int, int]:
    """(KV cache, activations + logits) bytes of a request over all its GPUs, uncorrected."""
    batch, prompt = shape.batch_size, shape.input_tokens
    kv = profile.kv_bytes_per_token * batch * (prompt + shape.output_tokens)
    tokens = batch * max(prompt, 1)
    scores = profile.score_bytes_per_pair * batch * prompt**2  # 0 unless attention is eager
    attention = profile.attention_bytes_per_token * tokens + scores
    activations = (
        max(profile.activation_bytes_per_token * tokens, attention)
        + profile.logits_bytes_per_sequence * batch
    )
    return kv, activations


def _checked_int(value: object, where: str, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 5.0 is the integer 5
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(where, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise InvalidRequest(where, f"must be at least {minimum}, got {value}")
    return value


def _checked_shape(shape: Shape) -> Shape:
    _checked_int(shape.batch_size, "shape.batch_size", 1)
    _checked_int(shape.input_tokens, "shape.input_tokens", 0)
    _checked_int(shape.output_tokens, "shape.output_tokens", 0)
    return shape


def _text_tokens(chars: int) -> int:
    return _ceil_div(chars, CHARS_PER_TOKEN)


def _count(profile: ModelProfile, task: Task, input: Mapping[str, Any]) -> Shape:
    """Count the shape of a request from its OpenAI-style input."""
    if not isinstance(input, Mapping):
        raise InvalidRequest("input", f"must be an object, got {type(input).__name__}")
    if task is Task.GENERIC:
        return Shape(1, 0, 0)
    if task is Task.CHAT:
        prompt = _chat_tokens(input.get("messages"))
        batch = _optional_int(input, "n", 1, 1)
        return Shape(batch, prompt, _output_tokens(profile, input, prompt))
    if task is Task.COMPLETION:
        prompts, prompt = _prompt_tokens(input, "prompt")
        batch = prompts * _optional_int(input, "n", 1, 1)
        return Shape(batch, prompt, _output_tokens(profile, input, prompt))
    if task is Task.EMBEDDING:
        inputs, prompt = _prompt_tokens(input, "input")
        return Shape(inputs, prompt, 0)
    assert_never(task)


def _optional_int(input: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = input.get(key)
    return default if value is None else _checked_int(value, f"input.{key}", minimum)


def _output_tokens(profile: ModelProfile, input: Mapping[str, Any], prompt: int) -> int:
    """New tokens per sequence: max_tokens, max_completion_tokens, or the model's default.

    An explicit value is at least 1 (as OpenAI's API requires) and is not cut; the model's
    default is cut to the context left after the prompt, and is at least 1 too: a prompt that
    fills the context leaves no room for an answer.
    """
    given = [
        _checked_int(input[key], f"input.{key}", 1)
        for key in ("max_tokens", "max_completion_tokens")
        if input.get(key) is not None
    ]
    if given:
        return given[0]
    return max(1, min(profile.max_output_tokens, profile.max_context - prompt))


def _chat_tokens(messages: object) -> int:
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequest(
            "input.messages", "must be a non-empty list of {role, content} objects"
        )
    total = _REPLY_PRIMING_TOKENS
    for index, message in enumerate(messages):
        where = f"input.messages[{index}]"
        if not isinstance(message, Mapping):
            raise InvalidRequest(where, "must be a {role, content} object")
        if not isinstance(message.get("role"), str):
            raise InvalidRequest(f"{where}.role", "must be a string")
        chars = _content_chars(message.get("content"), f"{where}.content")
        total += _text_tokens(chars) + _MESSAGE_OVERHEAD_TOKENS
    return total


def _content_chars(content: object, where: str) -> int:
    """Characters of a message's text: a string, null, or a list of parts (text parts count)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list | tuple):
        raise InvalidRequest(where, "must be a string or a list of content parts")
    chars = 0
    for index, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise InvalidRequest(f"{where}[{index}]", "must be a content part object")
        text = part.get("text")
        if text is None:
            continue  # an image or other non-text part
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}[{index}].text", "must be a string")
        chars += len(text)
    return chars


def _is_token_id(value: object) -> bool:
    if isinstance(value, float):
        return value.is_integer() and value >= 0  # JSON has one number type: 5.0 is 5
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prompt_tokens(input: Mapping[str, Any], key: str) -> tuple[int, int]:
    """(sequences, tokens of the longest) of a prompt or embedding input."""
    where = f"input.{key}"
    value = input.get(key)
    if value is None:
        raise InvalidRequest(where, "is required")
    if isinstance(value, str):
        return 1, _text_tokens(len(value))
    if not isinstance(value, list | tuple) or not value:
        raise InvalidRequest(where, _PROMPT_FORMS)
    if all(isinstance(item, str) for item in value):
        return len(value), max(_text_tokens(len(item)) for item in value)
    if all(_is_token_id(item) for item in value):
        return 1, len(value)
    if all(
        isinstance(item, list | tuple) and all(_is_token_id(token) for token in item)
        for item in value
    ):
        return len(value), max(len(item) for item in value)
    raise InvalidRequest(where, _PROMPT_FORMS)

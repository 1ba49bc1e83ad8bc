"""Built-in GPU types: the memory real devices report and the figures speed estimates start from."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUILTIN_GPU_TYPES", "GPUType", "gpu_type"]


@dataclass(frozen=True, slots=True)
class GPUType:
    """A kind of GPU: its usable memory and the peak figures a roofline estimate starts from.

    ``memory_mb`` is what NVML reports as total (MiB). ``tflops`` is dense BF16 tensor throughput,
    ``bandwidth_gbs`` the HBM/GDDR bandwidth; both are datasheet peaks.
    """

    name: str
    memory_mb: int
    tflops: float
    bandwidth_gbs: float


# Memory as real devices report it (SPEC §6; the H200 figure is the fixture's NVML reading).
# Peaks are NVIDIA datasheet values (SXM parts; L4 is the 72 W PCIe card).
BUILTIN_GPU_TYPES: dict[str, GPUType] = {
    "H100-80GB": GPUType("H100-80GB", 81559, 989.0, 3350.0),
    "A100-80GB": GPUType("A100-80GB", 81920, 312.0, 2039.0),
    "H200-141GB": GPUType("H200-141GB", 143771, 989.0, 4800.0),
    "L4-24GB": GPUType("L4-24GB", 23034, 121.0, 300.0),
}

# A type the router has no figures for is estimated as if it were this one.
_REFERENCE = BUILTIN_GPU_TYPES["H100-80GB"]


def gpu_type(name: str, memory_mb: int | None = None) -> GPUType:
    """Return the built-in type ``name``, or a custom one with ``memory_mb`` and H100 speed figures.

    Raises:
        KeyError: ``name`` is not built in and no ``memory_mb`` was given.
    """
    known = BUILTIN_GPU_TYPES.get(name)
    if known is not None:
        if memory_mb is None:
            return known
        return GPUType(name, memory_mb, known.tflops, known.bandwidth_gbs)
    if memory_mb is None:
        raise KeyError(name)
    return GPUType(name, memory_mb, _REFERENCE.tflops, _REFERENCE.bandwidth_gbs)

"""Whether bfloat16 matrix products pay on this machine: with CUDA they do; on a CPU it depends on
native bf16 instructions (AVX-512 BF16, AMX: ~2x float32's rate; AVX2 only: many times slower), so
it is measured once per process, never assumed."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def bfloat16_is_faster(device: str = "cpu") -> bool:
    """True when a [256, 512] x [512, 2048] product runs faster in bfloat16 than in float32 (best of 3)."""
    if torch.device(device).type == "cuda":
        return True
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 2048, generator=g)
    return _best_seconds(a.bfloat16(), b.bfloat16()) < _best_seconds(a, b)


def _best_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best

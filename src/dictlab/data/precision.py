"""Whether bfloat16 pays on this machine: with CUDA it does; on a CPU it depends on native bf16
instructions (AVX-512 BF16, AMX: ~2x float32's rate; AVX2 only: many times slower), so it is
measured, never assumed: once per process for matrix products (`bfloat16_is_faster`), and by a short
forward for a model (`choose_dtype`, model_dtype: auto)."""

from __future__ import annotations

import copy
import functools
import time

import torch

from dictlab.data import distributed


@functools.cache
def bfloat16_is_faster(device: str = "cpu") -> bool:
    """True when a [256, 512] x [512, 2048] product runs faster in bfloat16 than in float32 (best of 3).
    The same product on 32 rows is compared first: when bfloat16 is over twice as slow there, the answer
    is no without the full bfloat16 timing (on CPUs without native bf16 that alone took 7 s)."""
    if torch.device(device).type == "cuda":
        return True
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 2048, generator=g)
    low_a, low_b = a.bfloat16(), b.bfloat16()
    if _best_seconds(low_a[:32], low_b, runs=1) > 2 * _best_seconds(a[:32], b):
        return False
    return _best_seconds(low_a, low_b) < _best_seconds(a, b)


def _best_seconds(a: torch.Tensor, b: torch.Tensor, runs: int = 3) -> float:
    a @ b  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def choose_dtype(model) -> tuple:
    """(the model in its faster dtype, what was chosen and why). With CUDA: bfloat16. On a CPU: whichever
    of float32 and bfloat16 runs a short forward faster (bf16 is ~2x faster where the CPU has native bf16
    instructions and up to ~8x slower where it has not). The probe runs the decoder layers on 2 x 32
    tokens; a bf16 warm-up of 8 tokens slower than the whole float32 probe ends it early."""
    if distributed.device().type == "cuda":
        return model.to(torch.bfloat16), {"model_dtype": "bfloat16", "why": "CUDA"}
    ids = torch.randint(0, min(model.config.vocab_size, 1000), (2, 32), generator=torch.Generator().manual_seed(0))
    seconds = {"float32": _forward_seconds(model, ids[:1, :8], ids)}
    low = copy.deepcopy(model).to(torch.bfloat16)
    seconds["bfloat16 warm-up (8 tokens)"] = _forward_seconds(low, ids[:1, :8])
    if seconds["bfloat16 warm-up (8 tokens)"] < seconds["float32"]:
        seconds["bfloat16"] = _forward_seconds(low, ids)
    best = "bfloat16" if seconds.get("bfloat16", float("inf")) < seconds["float32"] else "float32"
    timings = ", ".join(f"{name} {t:.3g} s" for name, t in seconds.items())
    return (low if best == "bfloat16" else model), {
        "model_dtype": best, "seconds": seconds,
        "why": f"the faster on this CPU: decoder layers on 2 x 32 tokens took {timings}"}


@torch.no_grad()
def _forward_seconds(model, ids: torch.Tensor, timed: torch.Tensor | None = None) -> float:
    """Seconds of the decoder layers' forward on `timed` after a warm-up on `ids` (or of `ids` alone)."""
    start = time.perf_counter()
    model.base_model(ids)
    if timed is None:
        return time.perf_counter() - start
    start = time.perf_counter()
    model.base_model(timed)
    return time.perf_counter() - start

"""What a piece of work costs in memory: its peak resident set size (and CUDA memory when used).

On Linux the kernel's high-water mark (VmHWM) is reset before the work and read after it, so the
peak belongs to that work alone; elsewhere the process's lifetime peak (ru_maxrss) is reported.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _high_water_mark_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@contextmanager
def peak_memory() -> Iterator[dict]:
    """`with peak_memory() as m: work()` fills m with peak_rss_mb (and peak_cuda_mb when CUDA is used)."""
    out: dict = {}
    this_step = _reset_high_water_mark()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        out["peak_rss_mb"] = _high_water_mark_mb()
        if not this_step:
            out["peak_rss_scope"] = "process lifetime"
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

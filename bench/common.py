"""Shared by the benchmarks: the data they run on, and peers imported with a clear message."""

from __future__ import annotations

import importlib
import platform
from pathlib import Path

import torch


def load_rows(store: str | None, n: int, d: int, seed: int = 0, split: str = "train",
              site: str = "L8.resid_post") -> tuple[torch.Tensor, str]:
    """Real activations of `site` from a store when it holds enough, else Gaussian blobs."""
    if store and Path(store, "manifest.json").exists():
        from dictlab.data.store import Store

        s = Store(store)
        if site in s.sites and s.rows(split) >= n:
            return s.load(site, split, max_rows=n), f"{store} {site} ({split}, {n} rows)"
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(512, d, generator=g) * 2
    x = centers[torch.randint(0, 512, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x, f"synthetic: 512 Gaussian blobs, {n} x {d}"


def peer(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"this benchmark needs {module}: pip install -e '.[bench]'") from e


def cpu_flags() -> str:
    """The CPU's vector extensions that decide fp32 vs bf16 speed (Linux; empty elsewhere)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def machine() -> str:
    return (f"{platform.machine()} [{cpu_flags()}], {torch.get_num_threads()} threads, torch {torch.__version__}")

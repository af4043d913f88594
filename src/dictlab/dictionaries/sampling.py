"""Batch sources and the init sample every learner draws from them.

A source is a function returning an iterator of [rows, d] batches (a store reader, or a tensor split
into batches). `scan` takes one pass: a uniform sample of rows chosen by a hash of their content
(`row_keys`), so the sample is the same however the rows are batched, ordered or split across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from dictlab.data.distributed import World, world_of
from dictlab.errors import DictlabError

BatchSource = Callable[[], Iterator[torch.Tensor]]


def as_source(data: torch.Tensor | BatchSource, batch_size: int) -> BatchSource:
    """A tensor becomes a source of row batches; a source (e.g. a store reader) is kept as is."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2:
            raise DictlabError(f"data must be a 2-D [rows, d_model] tensor, got shape {tuple(data.shape)}")
        return lambda: iter(data.float().split(batch_size))
    return data



def _int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(h: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (h >> s) & ((1 << (64 - s)) - 1)


def row_keys(x: torch.Tensor, seed: int) -> torch.Tensor:
    """[N] float64 keys in [0, 1), a hash of each row's float32 bits and the seed.

    A key depends on the row alone, not on where it sits in the stream, so the sample of the rows with
    the smallest keys is the same however the rows are batched, ordered or split across ranks.
    The row's bits, read as int32, meet three random odd integer weights per column in one float64
    matrix product. Weights are small enough (< 2^(53 − 31 − ⌈log2 d⌉)) that every partial sum is an
    integer below 2^53, so the product is exact in any summation order, on any device (3x faster than
    the same sums in int64, which have no BLAS).
    """
    d = x.shape[1]
    weight_bits = 53 - 31 - max(1, math.ceil(math.log2(d)))
    g = torch.Generator().manual_seed(seed)
    weights = (torch.randint(0, 1 << (weight_bits - 1), (d, 3), generator=g) * 2 + 1).double().T.contiguous()
    weights = weights.to(x.device)
    bits = x.float().contiguous().view(torch.int32)
    # one float64 buffer for every chunk: a fresh one per chunk cost 4x the arithmetic in page faults
    exact = torch.empty(min(len(bits), 1024), d, dtype=torch.float64, device=x.device)
    sums = torch.cat([torch.nn.functional.linear(exact[: len(part)].copy_(part), weights)
                      for part in bits.split(1024)]).long()
    h = sums[:, 0] * _int64(0x9E3779B97F4A7C15) + sums[:, 1] * _int64(0xC2B2AE3D27D4EB4F) + sums[:, 2]
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # splitmix64's finaliser
        h = (h ^ _srl(h, shift)) * _int64(mult)
    h = h ^ _srl(h, 31)
    return _srl(h, 11).double() / 2.0**53


class Scan(NamedTuple):
    sample: torch.Tensor  # up to n rows, those with the smallest keys, in key order
    rows: int  # rows in the source (of every rank)
    max_abs: torch.Tensor  # [d]: each column's largest |value| in the source (of every rank)


def scan(source: BatchSource, n: int, seed: int, device: torch.device | str = "cpu") -> Scan:
    """One pass: a uniform sample of up to n rows (those with the smallest `row_keys`, in key order),
    the row count and each column's largest |value|. For a RankSource, every rank gets those of all ranks' rows.

    Also checks every row: NaN/Inf rows are an error that says how many and where. The keys are
    computed on `device`; the sample stays on the CPU.
    """
    pool, pool_key = None, torch.empty(0, dtype=torch.float64)
    rows, bad, first_bad, max_abs = 0, 0, None, None
    for batch in source():
        finite = torch.isfinite(batch.sum(1))  # a NaN or Inf anywhere in a row makes its sum non-finite
        if not bool(finite.all()):
            bad += int((~finite).sum())
            first_bad = first_bad if first_bad is not None else rows + int((~finite).nonzero()[0])
        keys = row_keys(batch.to(device, non_blocking=True), seed).cpu()
        if batch.shape[0]:  # largest |value| per column, without a temporary |batch|
            column_max = torch.maximum(batch.amax(0), batch.amin(0).neg_()).cpu()
            max_abs = column_max if max_abs is None else torch.maximum(max_abs, column_max)
        rows += batch.shape[0]
        if pool is None or pool.shape[0] < n:  # still filling the pool
            pool = batch.clone() if pool is None else torch.cat([pool, batch])  # never alias the data
            pool, pool_key = _smallest_keys(pool, torch.cat([pool_key, keys]), n)
            continue
        # a full pool: a new row enters only by evicting a pooled row with a larger key
        cand = (keys < pool_key.max()).nonzero().squeeze(1)
        if cand.numel() == 0:
            continue
        union = torch.cat([pool_key, keys[cand]])
        keep = torch.zeros(union.shape[0], dtype=torch.bool)
        keep[torch.topk(union, n, largest=False).indices] = True
        evicted = (~keep[:n]).nonzero().squeeze(1)
        entering = cand[keep[n:]]
        pool[evicted] = batch[entering]
        pool_key[evicted] = keys[entering]
    world = world_of(source)
    if world is not None:
        pool, pool_key, rows, bad = _merge_samples(world, pool, pool_key, rows, bad, n)
        max_abs = world.max(max_abs.float() if max_abs is not None else torch.zeros(pool.shape[1]))
    if bad:
        where = f"the first is row {first_bad}" if world is None else f"on {world.size} ranks"
        raise DictlabError(f"{bad} of {rows} rows hold NaN or Inf ({where}); clean the data first")
    if rows == 0:
        raise DictlabError("no data to fit on: the source gave no rows")
    pool_key, order = torch.sort(pool_key)
    return Scan(pool[order], rows, max_abs)


def _merge_samples(world: World, pool, pool_key, rows: int, bad: int, n: int):
    """The n smallest-key rows of all ranks' samples, on every rank."""
    width = world.max(torch.tensor([0 if pool is None else pool.shape[1]]))
    if pool is None:
        pool = torch.empty(0, int(width))
    pool, pool_key = _smallest_keys(world.cat(pool), world.cat(pool_key), n)
    return pool, pool_key, int(world.total(rows)), int(world.total(bad))


def _smallest_keys(rows: torch.Tensor, keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with the n smallest keys (all of them when there are no more than n), and their keys."""
    if rows.shape[0] <= n:
        return rows, keys
    keys, idx = torch.topk(keys, n, largest=False)
    return rows[idx], keys


def random_sample(source: BatchSource, n: int, seed: int) -> torch.Tensor:
    return scan(source, n, seed).sample

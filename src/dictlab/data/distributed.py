"""Data parallelism on torch.distributed: one process per device, launched by `torchrun`.

A learner takes its rows from a batch source. A source made for one rank (its shards of a store, its
rows of a tensor) is a `RankSource`: it carries the `World`, and the learner reduces its partial sums
over that world (k-means and EM once per pass, SAE gradients once per step), so every rank ends with
the same model. A plain source is one process's whole data and nothing is reduced; that is how rank 0
evaluates on its own while the others wait.

CPU tensors are reduced over gloo, CUDA tensors over the default group (NCCL on GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dictlab.errors import DictlabError

# Ranks wait for each other at stages that one rank does alone (evaluation, the report): give them hours.
TIMEOUT = timedelta(hours=int(os.environ.get("DICTLAB_DIST_TIMEOUT_HOURS", "6")))


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _group(self, t: torch.Tensor):
        return None if t.device.type != "cpu" else _cpu_group()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce a tensor in place by summing over ranks; returns it."""
        dist.all_reduce(t, group=self._group(t))
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group(t))
        return t

    def min(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._group(t))
        return t

    def total(self, value: float) -> float:
        """A Python number summed over ranks (in float64)."""
        return float(self.sum(torch.tensor([float(value)], dtype=torch.float64))[0])

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0, in rank order (ranks may hold different row counts)."""
        group = self._group(t)
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n, group=group)
        counts = [int(c) for c in counts]
        width = max(counts)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(t, src, group=self._group(t))
        return t

    def barrier(self) -> None:
        dist.barrier(group=_cpu_group())

    def agree(self, ok: bool) -> bool:
        """True on every rank when `ok` is true on every rank: lets all ranks fail together, not deadlock."""
        return bool(self.min(torch.tensor([int(ok)]))[0])


_CPU_GROUP = None


def _cpu_group():
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo", timeout=TIMEOUT)
    return _CPU_GROUP


def is_main(world: World | None) -> bool:
    """True for rank 0, and for a single process: the one that saves, reports and shows progress."""
    return world is None or world.main


def position(world: World | None) -> tuple[int, int]:
    """(rank, number of ranks); (0, 1) for a single process."""
    return (0, 1) if world is None else (world.rank, world.size)


def current() -> World | None:
    """The world of this process when it is one of several ranks, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env() -> World | None:
    """Join the process group that torchrun describes (WORLD_SIZE > 1 in the environment): NCCL with
    one GPU per process when CUDA is present, else gloo. A single process returns None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return current()


def device() -> torch.device:
    """Where this process computes: its GPU (cuda:LOCAL_RANK) when CUDA is present, else the CPU.
    DICTLAB_DEVICE=cpu keeps a GPU machine's run on the CPU."""
    if os.environ.get("DICTLAB_DEVICE") == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class RankSource:
    """One rank's part of the data as a batch source: `source()` yields this rank's batches."""

    def __init__(self, source: Callable[[], Iterator], world: World):
        self.source, self.world = source, world

    def __call__(self) -> Iterator:
        return self.source()


def world_of(source) -> World | None:
    return getattr(source, "world", None)


def rank_slice(n: int, world: World | None) -> slice:
    """This rank's contiguous part of n items (the first ranks take one more when n does not divide)."""
    if world is None:
        return slice(0, n)
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def check_shards(n_shards: int, world: World, what: str) -> None:
    if n_shards < world.size:
        raise DictlabError(f"{what} has {n_shards} shard(s) for {world.size} ranks: each rank reads whole shards, "
                           "so extract with more shards (smaller extract.batches_per_shard) or run fewer ranks")


def batch_mean(t: torch.Tensor, world: World | None) -> torch.Tensor:
    """Mean over dim 0 of a batch whose rows the ranks of `world` hold in parts (all of it without one)."""
    if world is None:
        return t.mean(0)
    total = torch.cat([t.sum(0, dtype=torch.float64).reshape(-1), t.new_full((1,), t.shape[0], dtype=torch.float64)])
    total = world.sum(total)
    return (total[:-1] / total[-1]).to(t.dtype).reshape(t.shape[1:])

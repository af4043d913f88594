"""Run a function in 2 (or more) CPU processes joined by gloo, as torchrun would, for the distributed tests."""

from __future__ import annotations

import os
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dictlab.distributed import World


def _entry(rank: int, fn, size: int, rendezvous: str, args: tuple):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    try:
        fn(World(rank, size, rank), *args)
    finally:
        dist.destroy_process_group()


def on_ranks(fn, tmp_path, *args, size: int = 2) -> None:
    """fn(world, *args) on `size` ranks; raises when any rank fails. fn must be a module-level function."""
    rendezvous = tmp_path / f"rendezvous-{uuid.uuid4().hex}"  # a fresh file: a used one holds stale addresses
    mp.spawn(_entry, args=(fn, size, str(rendezvous), args), nprocs=size)

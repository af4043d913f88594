"""Scaling on torch.distributed: throughput of the same work with 1 and 2 CPU processes (gloo), one run.

Three stages, each timed between barriers on every rank (the slowest rank counts):
  k-means   Lloyd iterations over N rows (d = 640, K = 256), the rows split between the ranks
  SAE       TopK SAE training steps (d = 640, 4096 latents, k = 32), a global batch of 4096 rows
            split between the ranks (DistributedDataParallel)
  extract   `extract()` of the embedded Gemma 3 270M, layer 8, float32, contexts of 128
Each stage runs as 1 process × 1 thread, 2 processes × 1 thread, and 1 process × 2 threads (this
machine's cores used by intra-op threads instead of ranks). Scaling efficiency = throughput with 2
processes / (2 × throughput with 1 process of 1 thread); 1.0 is perfect.

    python bench/scale.py [--rows 100000] [--steps 20] [--tokens 8192] [--stages kmeans,sae,extract]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import load_rows, machine

from dictlab.data.distributed import RankSource, World, rank_slice


def _kmeans(world, args, x):
    from dictlab.dictionaries import KMeans
    from dictlab.dictionaries.sampling import as_source

    part = as_source(x[rank_slice(len(x), world)], 8192)
    source = part if world is None else RankSource(part, world)
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]].clone()
    KMeans(256, max_iter=args.iters, tol=0).fit(source, progress=False, init=init)
    return len(x) * args.iters  # rows visited


def _sae(world, args, x):
    from dictlab.dictionaries.sae import SparseAutoencoder
    from dictlab.dictionaries.train import TrainConfig, tensor_batches, train_sweep

    batches = tensor_batches(x, 4096, seed=0)
    mine = (lambda start: (b[rank_slice(4096, world)] for b in batches(start))) if world else batches
    sae = SparseAutoencoder(x.shape[1], 4096, rule="topk", k=32)
    train_sweep([sae], mine, TrainConfig(steps=args.steps, warmup_steps=0), progress=False, world=world)
    return 4096 * args.steps


def _extract(world, args, out):
    from dictlab.data.corpus import CorpusConfig
    from dictlab.data.extract import ExtractConfig, extract

    cfg = ExtractConfig(layers=[8], sites=["resid_post"], context_length=128, batch_size=8,
                        train_tokens=args.tokens, eval_tokens=512, model_dtype="float32")
    extract("gemma3-270m", CorpusConfig(), cfg, out, progress=False)
    return args.tokens + 512


def _worker(rank, size, threads, stage, args, data, rendezvous, result):
    torch.set_num_threads(threads)
    world = None
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
        world = World(rank, size, rank)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    if stage == "extract":  # load and convert the model outside the timing
        from dictlab.data.lm import shared_model

        shared_model("gemma3-270m", "float32")
    if world:
        world.barrier()
    start = time.perf_counter()
    work = {"kmeans": _kmeans, "sae": _sae, "extract": _extract}[stage](world, args, data)
    if world:
        world.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(result).write_text(json.dumps({"per_s": work / seconds, "seconds": seconds}))
    if world:
        dist.destroy_process_group()


def measure(stage, size, threads, args, data, scratch: Path) -> dict:
    result = scratch / f"{uuid.uuid4().hex}.json"
    if stage == "extract":
        data = str(scratch / f"store-{size}x{threads}")
    mp.spawn(_worker, args=(size, threads, stage, args, data, str(scratch / uuid.uuid4().hex), str(result)),
             nprocs=size)
    return json.loads(result.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="../runs/demo/store", help="real rows for k-means and the SAE, when present")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--stages", default="kmeans,sae,extract")
    args = p.parse_args()
    x, what = load_rows(args.store, args.rows, 640)
    print(f"data: {what}; {machine()}")
    unit = {"kmeans": "rows/s", "sae": "rows/s", "extract": "tokens/s"}
    print(f"| stage | processes × threads | {'throughput':>12} | vs 1×1 | scaling efficiency |")
    print("| --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        for stage in args.stages.split(","):
            base = None
            for size, threads in ((1, 1), (2, 1), (1, 2)):
                r = measure(stage, size, threads, args, x, Path(scratch))
                base = base or r["per_s"]
                eff = f"{r['per_s'] / (2 * base):.2f}" if size == 2 else ""
                print(f"| {stage} | {size} × {threads} | {r['per_s']:>8.0f} {unit[stage]} | "
                      f"{r['per_s'] / base:.2f} | {eff} |", flush=True)


if __name__ == "__main__":
    main()

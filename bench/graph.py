"""Cross-layer co-activation statistics of two 16k-unit dictionaries: dictlab's sparse products
(graph.co_activation) vs the dense approach, chunked AᵀA in torch (a float32 [units, units]
accumulator for the products and one for the counts).

Codes are synthetic TopK codes: k random units per token with uniform values, independent between
the two sides (the worst case for sparsity: almost every pair co-occurs somewhere). The dense
approach is timed on the first --dense-tokens tokens and its time scaled linearly to --tokens (it
does the same work per token); both are checked to give the same counts on that prefix.

    .venv/bin/python bench/graph.py --tokens 1000000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse
import torch
from common import machine

from dictlab.analyses.graph import co_activation
from dictlab.data.resources import peak_memory


def topk_codes(n: int, units: int, k: int, seed: int, batch: int = 4096):
    """Batches of [rows, units] sparse codes: k random units per row (a repeat is summed), values in (0, 1]."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        idx = torch.randint(units, (rows, k), generator=g)
        val = torch.rand(rows, k, generator=g) + 1e-3
        yield scipy.sparse.csr_matrix((val.flatten().double().numpy(),
                                       (np.repeat(np.arange(rows), k), idx.flatten().numpy())), shape=(rows, units))


def sparse(n: int, units: int, k: int, block: int):
    start = time.perf_counter()
    with peak_memory() as memory:
        pairs = co_activation(zip(topk_codes(n, units, k, 1), topk_codes(n, units, k, 2)), block_rows=block)
    return time.perf_counter() - start, memory["peak_rss_mb"], pairs


def dense(n: int, units: int, k: int):
    start = time.perf_counter()
    with peak_memory() as memory:
        products = torch.zeros(units, units)
        counts = torch.zeros(units, units)
        for a, b in zip(topk_codes(n, units, k, 1), topk_codes(n, units, k, 2)):
            a, b = torch.from_numpy(a.toarray()).float(), torch.from_numpy(b.toarray()).float()
            products.addmm_(a.T, b)
            counts.addmm_((a != 0).float().T, (b != 0).float())
    return time.perf_counter() - start, memory["peak_rss_mb"], counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--units", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dense-tokens", type=int, default=16384, help="tokens the dense approach is timed on")
    parser.add_argument("--block", type=int, default=1 << 16, help="tokens per sparse product")
    args = parser.parse_args()
    print(f"{machine()}; {args.tokens} tokens, two dictionaries of {args.units} units, k = {args.k}")
    t_check, _, check = sparse(args.dense_tokens, args.units, args.k, args.block)
    t_dense, mem_dense, counts = dense(args.dense_tokens, args.units, args.k)
    agree = np.array_equal(counts[check.i, check.j].numpy().astype(np.int64), check.count) and \
        int(counts.sum()) == int(check.count.sum())
    print(f"on {args.dense_tokens} tokens: sparse {t_check:.1f} s, dense {t_dense:.1f} s; same counts: {agree}")
    t_sparse, mem_sparse, pairs = sparse(args.tokens, args.units, args.k, args.block)
    scaled = t_dense * args.tokens / args.dense_tokens
    print(f"| method | time (s) | peak RSS (MB) | co-active pairs |\n| --- | ---: | ---: | ---: |\n"
          f"| dense AᵀA, chunked (torch, float32) | {scaled:.0f} (scaled from {args.dense_tokens} tokens) | "
          f"{mem_dense:.0f} | {args.units ** 2} (all) |\n"
          f"| dictlab sparse products | {t_sparse:.0f} | {mem_sparse:.0f} | {len(pairs.i)} |\n"
          f"speed-up {scaled / t_sparse:.1f}x")


if __name__ == "__main__":
    main()

"""Lloyd k-means: dictlab against scikit-learn KMeans, MiniBatchKMeans, faiss-cpu and fastkmeans, one run.

Same rows (the demo store's layer 8 activations when present, N = 200k, d = 640), same initial
centres for every Lloyd implementation, same iteration count, tolerance 0. Reported: seconds per
iteration and the final inertia, which we compute ourselves for every method from its centres.
dictlab is timed through `KMeans.fit` (its first pass, which samples and checks every row for
NaN/Inf, is counted in).

    python bench/kmeans.py [--store runs/demo/store] [--ks 64,256,1024] [--iters 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import load_rows, machine, peer

from dictlab.dictionaries import KMeans
from dictlab.dictionaries.lloyd import sq_distances


def inertia(x: torch.Tensor, centers) -> float:
    c = torch.as_tensor(np.asarray(centers), dtype=torch.float32)
    return sum(float(sq_distances(b, c).min(1).values.double().sum()) for b in x.split(8192))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/store")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--ks", default="64,256,1024")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    sk_cluster, faiss, fastkmeans = peer("sklearn.cluster"), peer("faiss"), peer("fastkmeans")
    x, what = load_rows(args.store, args.rows, 640)
    xn = x.numpy()
    print(f"data: {what}; {machine()}; {args.iters} iterations")
    print(f"{'K':>5} {'method':<34} {'s/iter':>8} {'vs dictlab':>10} {'inertia / dictlab':>18}")
    for k in map(int, args.ks.split(",")):
        init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(k))[:k]].clone()
        rows = []
        t = time.perf_counter()
        ours = KMeans(k, max_iter=args.iters, tol=0).fit(x, progress=False, init=init)
        rows.append(("dictlab KMeans (fp32)", (time.perf_counter() - t) / args.iters, inertia(x, ours.centers)))
        t = time.perf_counter()
        sk = sk_cluster.KMeans(k, init=init.numpy(), n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd").fit(xn)
        rows.append(("scikit-learn KMeans (lloyd)", (time.perf_counter() - t) / args.iters,
                     inertia(x, sk.cluster_centers_)))
        t = time.perf_counter()
        fk = faiss.Kmeans(640, k, niter=args.iters, seed=0, max_points_per_centroid=10**9, verbose=False)
        fk.train(xn, init_centroids=init.numpy())
        rows.append(("faiss-cpu Kmeans", (time.perf_counter() - t) / args.iters, inertia(x, fk.centroids)))
        t = time.perf_counter()  # fastkmeans takes no initial centres: its own seeded random rows
        fast = fastkmeans.FastKMeans(640, k, niter=args.iters, tol=-1, gpu=False, seed=0,
                                     max_points_per_centroid=10**9).fit(xn)
        rows.append(("fastkmeans (own random-row init)", (time.perf_counter() - t) / args.iters,
                     inertia(x, fast.centroids)))
        t = time.perf_counter()
        mb = sk_cluster.MiniBatchKMeans(k, init=init.numpy(), n_init=1, batch_size=4096, max_iter=2,
                                        max_no_improvement=None, tol=0).fit(xn)
        rows.append(("scikit-learn MiniBatchKMeans (2 ep.)", (time.perf_counter() - t) / args.iters,
                     inertia(x, mb.cluster_centers_)))
        base_t, base_i = rows[0][1], rows[0][2]
        for name, sec, inert in rows:
            print(f"{k:>5} {name:<34} {sec:>8.3f} {sec / base_t:>9.2f}x {inert / base_i:>18.5f}")


if __name__ == "__main__":
    main()

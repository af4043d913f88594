"""Lloyd k-means: dictlab against scikit-learn KMeans, MiniBatchKMeans, faiss-cpu and fastkmeans, one run.

Same rows (the demo store's layer 8 activations when present, N = 200k, d = 640), same initial
centres for every Lloyd implementation, same iteration count, tolerance 0. Reported: seconds per
iteration (the median of --rounds interleaved rounds, each running every method once: these
machines' speed drifts by tens of percent within minutes) and the final inertia, which we compute
ourselves for every method from its centres.
dictlab is timed through `KMeans.fit` (its first pass, which samples and checks every row for
NaN/Inf, is counted in); it takes bfloat16 distance products with a float32 recheck wherever a
measured bfloat16 product is faster. Then, on the first --recheck-rows rows, Lloyd's passes with and
without the bfloat16 products side by side: their speed, how many rows the recheck recomputed in
float32, and whether the assignments are equal (--recheck-rows 0 skips it). With --store-fits, dictlab
alone as the pipeline runs it: `KMeans.fit` on the store itself (k-means++ on its sample included),
with the rows kept in memory after the first pass and with every pass reading the store.

    python bench/kmeans.py [--store runs/demo/store] [--ks 64,256,1024] [--iters 10] [--rounds 3]
                           [--recheck-rows 20000] [--store-fits]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import load_rows, machine, peer

from dictlab.data.precision import bfloat16_is_faster
from dictlab.dictionaries import KMeans
from dictlab.dictionaries.lloyd import lloyd, sq_distances
from dictlab.dictionaries.sampling import as_source


def inertia(x: torch.Tensor, centers) -> float:
    c = torch.as_tensor(np.asarray(centers), dtype=torch.float32)
    return sum(float(sq_distances(b, c).min(1).values.double().sum()) for b in x.split(8192))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/store")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--ks", default="64,256,1024")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats per method; the median is reported")
    p.add_argument("--recheck-rows", type=int, default=20_000)
    p.add_argument("--skip-peers", action="store_true", help="only the bfloat16 recheck comparison")
    p.add_argument("--store-fits", action="store_true", help="also fit from the store: rows kept vs re-read")
    args = p.parse_args()
    sk_cluster, faiss, fastkmeans = peer("sklearn.cluster"), peer("faiss"), peer("fastkmeans")
    x, what = load_rows(args.store, args.rows, 640)
    xn = x.numpy()
    print(f"data: {what}; {machine()}; {args.iters} iterations; median (min-max) of {args.rounds} interleaved rounds")
    print(f"{'K':>5} {'method':<36} {'s/iter':>8} {'min-max':>13} {'vs dictlab':>10} {'inertia / dictlab':>18}")
    for k in map(int, args.ks.split(",")) if not args.skip_peers else []:
        init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(k))[:k]].clone()
        fits = {
            "dictlab KMeans (fp32)": lambda: KMeans(k, max_iter=args.iters, tol=0).fit(
                x, progress=False, init=init).centers,
            "scikit-learn KMeans (lloyd)": lambda: sk_cluster.KMeans(
                k, init=init.numpy(), n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd").fit(xn).cluster_centers_,
            "faiss-cpu Kmeans": lambda: faiss_fit(faiss, xn, k, args.iters, init),
            # fastkmeans takes no initial centres: its own seeded random rows
            "fastkmeans (own random-row init)": lambda: fastkmeans.FastKMeans(
                640, k, niter=args.iters, tol=-1, gpu=False, seed=0, max_points_per_centroid=10**9).fit(xn).centroids,
            "scikit-learn MiniBatchKMeans (2 ep.)": lambda: sk_cluster.MiniBatchKMeans(
                k, init=init.numpy(), n_init=1, batch_size=4096, max_iter=2, max_no_improvement=None,
                tol=0).fit(xn).cluster_centers_,
        }
        seconds, inertias = {name: [] for name in fits}, {}
        for r in range(args.rounds):  # each round runs every method once, starting one later each round
            names = list(fits)[r % len(fits):] + list(fits)[: r % len(fits)]
            for name in names:
                t = time.perf_counter()
                centers = fits[name]()
                seconds[name].append((time.perf_counter() - t) / args.iters)
                inertias[name] = inertia(x, centers)
        base_t, base_i = statistics.median(seconds["dictlab KMeans (fp32)"]), inertias["dictlab KMeans (fp32)"]
        for name in fits:
            sec = statistics.median(seconds[name])
            spread = f"{min(seconds[name]):.3f}-{max(seconds[name]):.3f}"
            print(f"{k:>5} {name:<36} {sec:>8.3f} {spread:>13} {sec / base_t:>9.2f}x {inertias[name] / base_i:>18.5f}")
    if args.recheck_rows:
        recheck(x[: args.recheck_rows], map(int, args.ks.split(",")), args.iters)
    if args.store_fits:
        store_fits(args.store, map(int, args.ks.split(",")), args.iters)


def faiss_fit(faiss, xn, k: int, iters: int, init: torch.Tensor):
    fk = faiss.Kmeans(640, k, niter=iters, seed=0, max_points_per_centroid=10**9, verbose=False)
    fk.train(xn, init_centroids=init.numpy())
    return fk.centroids


def store_fits(store: str, ks, iters: int) -> None:
    """KMeans.fit on the store (the pipeline's path), rows kept after the first pass vs read every pass."""
    from unittest import mock

    from dictlab.data.store import Store
    from dictlab.dictionaries import lloyd as engine

    source = Store(store).source("L8.resid_post", "train", 8192)
    print(f"\nKMeans.fit on the store ({iters} passes, k-means++ included), s/iter")
    print(f"{'K':>5} {'rows kept':>10} {'store read every pass':>22} {'same centres':>13}")
    for k in ks:
        fits = {}
        for kept in (True, False):
            with mock.patch.object(engine, "free_bytes", lambda device, kept=kept: (1 << 40) if kept else 0):
                t = time.perf_counter()
                fits[kept] = (KMeans(k, max_iter=iters, tol=0).fit(source, progress=False),
                              (time.perf_counter() - t) / iters)
        same = torch.equal(fits[True][0].centers, fits[False][0].centers)
        print(f"{k:>5} {fits[True][1]:>10.3f} {fits[False][1]:>22.3f} {'yes' if same else 'NO':>13}")


def recheck(x: torch.Tensor, ks, iters: int) -> None:
    print(f"\nbfloat16 distance products with the float32 recheck, {len(x)} rows, {iters} passes "
          f"(bfloat16 measured faster here: {bfloat16_is_faster()})")
    print(f"{'K':>5} {'fp32 s/pass':>12} {'bf16 s/pass':>12} {'rechecked rows':>15} {'assignments':>12}")
    shift = x.mean(0)
    for k in ks:
        init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(k))[:k]] - shift
        common = dict(max_abs=x.abs().amax(0), rows=len(x), shift=shift, progress=False)
        t = time.perf_counter()
        (exact,) = lloyd(as_source(x, 8192), [init], iters, 0, bf16=False, **common)
        t_exact = (time.perf_counter() - t) / iters
        t = time.perf_counter()
        (low,) = lloyd(as_source(x, 8192), [init], iters, 0, bf16=True, **common)
        t_low = (time.perf_counter() - t) / iters
        same = all(torch.equal(a, b) for a, b in zip(exact.labels, low.labels))
        print(f"{k:>5} {t_exact:>12.3f} {t_low:>12.3f} {low.rechecked / low.rows:>14.2%} "
              f"{'equal' if same else 'DIFFER':>12}")


if __name__ == "__main__":
    main()

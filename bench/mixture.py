"""Diagonal Gaussian mixture: dictlab against scikit-learn GaussianMixture, one run, same data.

N = 100k training rows and 20k held-out rows (the demo store's train and eval splits when present),
d = 640, K in {64, 256}; both start from the same means (random rows), unit variances and equal
weights, and run the same number of EM iterations with tolerance 0. Reported: seconds per
iteration and held-out log-likelihood per row. scikit-learn runs in float64 (it casts float32 input
up); so does dictlab's E- and M-step arithmetic since issue 20 (rows stored in float32).

    python bench/mixture.py [--store runs/demo/store] [--ks 64,256] [--iters 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import load_rows, machine, peer

from dictlab.dictionaries import GaussianMixture


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/store")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--ks", default="64,256")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    mixture = peer("sklearn.mixture")
    x, what = load_rows(args.store, args.rows, 640)
    held, held_what = load_rows(args.store, 20_000, 640, seed=1, split="eval")
    # the store's eval split is 20k rows in the demo; synthetic data otherwise
    print(f"train: {what}; held out: {held_what}; {machine()}; {args.iters} EM iterations")
    print(f"{'K':>4} {'method':<36} {'s/iter':>8} {'speed-up':>9} {'held-out loglik/row':>20}")
    for k in map(int, args.ks.split(",")):
        init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(k))[:k]].clone()
        t = time.perf_counter()
        ours = GaussianMixture(k, max_iter=args.iters, tol=0).fit(x, progress=False, init={"means": init})
        ours_t = (time.perf_counter() - t) / args.iters
        ours_ll = ours.score(held)[0]
        t = time.perf_counter()
        sk = mixture.GaussianMixture(k, covariance_type="diag", means_init=init.double().numpy(),
                                     weights_init=np.full(k, 1 / k), precisions_init=np.ones((k, 640)),
                                     max_iter=args.iters, tol=0, reg_covar=1e-6).fit(x.numpy())
        sk_t = (time.perf_counter() - t) / args.iters
        sk_ll = float(sk.score(held.numpy()))
        print(f"{k:>4} {'dictlab GaussianMixture (diag)':<36} {ours_t:>8.3f} {sk_t / ours_t:>8.2f}x {ours_ll:>20.3f}")
        print(f"{k:>4} {'scikit-learn GaussianMixture (diag)':<36} {sk_t:>8.3f} {1:>8.2f}x {sk_ll:>20.3f}")


if __name__ == "__main__":
    main()

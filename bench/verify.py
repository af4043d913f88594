"""What checking every shard against its sha256 as it is read costs (docs/integrity.md): the same work on
the same store with the check on and off, interleaved, the median of the repeats.

  read   one pass over the train split of one site, nothing else (the worst case: all I/O and hashing)
  fit    Lloyd k-means streamed over the store (K, iterations below), a fit whose every pass reads it all

Each timed run starts as a fresh process would, with no shard verified yet: the first pass hashes every
shard file whole (every site in it, while the fit reads one), later passes trust what was verified.

  python bench/verify.py --store runs/demo/store
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import machine

from dictlab.data import integrity
from dictlab.data.store import Store
from dictlab.dictionaries.kmeans import KMeans


def read_pass(store: Store, site: str, batch: int) -> None:
    for _ in store.batches(site, "train", batch):
        pass


def kmeans_fit(store: Store, site: str, batch: int, k: int, iterations: int) -> None:
    KMeans(k, max_iter=iterations, tol=0.0, batch_size=batch).fit(store.source(site, "train", batch), progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/store")
    p.add_argument("--site", default="L8.resid_post")
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    on, off = Store(args.store, verify=True), Store(args.store, verify=False)
    info = on.info()
    print(f"{machine()}\nstore {args.store}: {info['rows']['train']} train rows, sites {', '.join(on.sites)}, "
          f"{info['bytes'] / 1e9:.2f} GB of shards")
    work = {"read": lambda s: read_pass(s, args.site, args.batch),
            f"fit (k-means K={args.k}, {args.iterations} passes)":
                lambda s: kmeans_fit(s, args.site, args.batch, args.k, args.iterations)}
    for name, run in work.items():
        run(off)  # warm the page cache
        times = {"on": [], "off": []}
        for _ in range(args.repeats):
            for label, store in (("off", off), ("on", on)):
                integrity._verified.clear()  # as in a fresh process
                start = time.perf_counter()
                run(store)
                times[label].append(time.perf_counter() - start)
        t_on, t_off = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"{name}: verify on {t_on:.2f} s, off {t_off:.2f} s, cost {100 * (t_on / t_off - 1):+.1f}% "
              f"(repeats on {[round(t, 2) for t in times['on']]}, off {[round(t, 2) for t in times['off']]})")


if __name__ == "__main__":
    main()

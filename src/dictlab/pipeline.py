"""The stages as plain functions over a run directory, and `run`, which chains them.

    runs/<name>/config.json                          the experiment config as run
    runs/<name>/store/                                activation store (see store.py)
    runs/<name>/dictionaries/<site>/<method>-k64/     one fitted dictionary
    runs/<name>/results.json                          metrics on the eval split, per dictionary and decoding

A stage whose artifact exists for the same inputs is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from dictlab.config import EvalConfig, ExperimentConfig
from dictlab.dictionaries import (
    Dictionary, GaussianMixture, KMeans, MiniBatchKMeans, MixturePPCA, ResidualKMeans, SphericalKMeans, fit_many,
    load_dictionary,
)
from dictlab.dictionaries.mixture import Mixture
from dictlab.errors import DictlabError
from dictlab.extract import extract
from dictlab.io import config_hash, read_json, write_json
from dictlab.metrics import evaluate_reconstruction
from dictlab.store import Store


def run_dir(cfg: ExperimentConfig, runs_root: str | Path = "runs") -> Path:
    return Path(runs_root) / cfg.name


def stage_extract(cfg: ExperimentConfig, run: Path, progress: bool = True) -> Store:
    return Store(extract(cfg.model, cfg.corpus, cfg.extract, run / "store", progress=progress))


def _store_id(store: Store) -> str:
    return config_hash(store.manifest["spec"])


def build_dictionary(spec, k: int) -> Dictionary:
    """An unfitted dictionary for one entry of the `fit:` list and one K."""
    common = dict(max_iter=spec.max_iter, tol=spec.tol, seed=spec.seed, init_sample=spec.init_sample,
                  batch_size=spec.batch_size)
    if spec.method in ("kmeans", "spherical_kmeans"):
        cls = KMeans if spec.method == "kmeans" else SphericalKMeans
        return cls(k, n_init=spec.n_init, **common)
    if spec.method == "minibatch_kmeans":
        return MiniBatchKMeans(k, epochs=spec.epochs, **common)
    if spec.method == "residual_kmeans":
        return ResidualKMeans(k, stages=spec.stages, **common)
    em = dict(reg_covar=spec.reg_covar, init_iter=spec.init_iter, **common)
    if spec.method == "gmm":
        return GaussianMixture(k, covariance=spec.covariance, **em)
    return MixturePPCA(k, q=spec.q, **em)


def fit_dictionaries(store: Store, specs: list, out: Path, progress: bool = True) -> list[Path]:
    """Fit one dictionary per (site, method entry, K); a saved one with the same inputs is reused.

    Lloyd and spherical k-means fit all their K in shared passes over the store.
    """
    folders = []
    for site in store.sites:
        source = lambda site=site, bs=None: store.batches(site, "train", bs)  # noqa: E731
        for spec in specs:
            todo = []
            for k in spec.k:
                folder = Path(out) / site / spec.folder(k)
                inputs = {"store": _store_id(store), "site": site, "fit": spec.model_dump(exclude={"k"}), "k": k}
                folders.append(folder)
                done = folder / "config.json"
                if done.exists() and read_json(done).get("inputs") == inputs:
                    continue
                if k > store.rows("train"):
                    raise DictlabError(f"k={k} is larger than the number of training rows ({store.rows('train')})")
                todo.append((build_dictionary(spec, k), folder, inputs))
            if not todo:
                continue
            batches = lambda: source(bs=spec.batch_size)  # noqa: E731
            start = time.perf_counter()
            if spec.method in ("kmeans", "spherical_kmeans"):
                fit_many([d for d, _, _ in todo], batches, progress)
                seconds = [(time.perf_counter() - start) / len(todo)] * len(todo)  # shared passes: split evenly
            else:
                seconds = []
                for d, _, _ in todo:
                    t = time.perf_counter()
                    if spec.method == "minibatch_kmeans":
                        d.fit(batches, progress, shuffled=lambda e, d=d: store.batches(
                            site, "train", spec.batch_size, shuffle=True, seed=spec.seed + e))
                    else:
                        d.fit(batches, progress)
                    seconds.append(time.perf_counter() - t)
            for (d, folder, inputs), sec in zip(todo, seconds):
                d.save(folder, extra={"inputs": inputs, "site": site, "fit_seconds": sec,
                                      "train_rows": store.rows("train")})
    return folders


def evaluate_dictionaries(store: Store, folders: list[Path], cfg: EvalConfig) -> list[dict]:
    """One row per dictionary and decoding; mixtures add held-out log-likelihood per token and BIC."""
    rows = []
    for folder in folders:
        meta = read_json(Path(folder) / "config.json")
        site = meta.get("site")
        if site is None:
            raise DictlabError(f"{folder}: the dictionary does not say which site it was fitted on")
        dictionary = load_dictionary(folder)
        if dictionary.d_model != store.d_model(site):
            raise DictlabError(
                f"{folder}: dictionary has d_model {dictionary.d_model} but site {site} in the store has "
                f"{store.d_model(site)}"
            )
        extra = {}
        if isinstance(dictionary, Mixture):
            ll, n = dictionary.score(lambda: store.batches(site, "eval", cfg.batch_size))
            extra = {"loglik_per_token": ll,
                     "bic": -2 * ll * n + dictionary.n_parameters() * math.log(n)}
        for decoding in dictionary.decodings or (None,):
            view = dictionary.with_decoding(decoding) if decoding else dictionary
            metrics = evaluate_reconstruction(view, store.batches(site, "eval", cfg.batch_size))
            rows.append({
                "dictionary": str(folder), "method": dictionary.kind, "decoding": decoding, "site": site,
                "n_latents": dictionary.n_latents, "fit_seconds": meta.get("fit_seconds"),
                **metrics.as_dict(), **extra,
            })
    return rows


def stage_evaluate(store: Store, folders: list[Path], cfg: EvalConfig, out: Path) -> list[dict]:
    inputs = {
        "store": _store_id(store), "eval": cfg.model_dump(),
        "dictionaries": [config_hash(read_json(Path(f) / "config.json")) for f in folders],
    }
    if out.exists():
        previous = read_json(out)
        if previous.get("inputs") == inputs:
            return previous["results"]
    results = evaluate_dictionaries(store, folders, cfg)
    write_json(out, {"inputs": inputs, "eval_rows": store.rows("eval"), "results": results})
    return results


def run_experiment(cfg: ExperimentConfig, runs_root: str | Path = "runs", progress: bool = True) -> list[dict]:
    run = run_dir(cfg, runs_root)
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "config.json").exists() or read_json(run / "config.json") != cfg.model_dump():
        write_json(run / "config.json", cfg.model_dump())
    store = stage_extract(cfg, run, progress)
    folders = fit_dictionaries(store, cfg.fit, run / "dictionaries", progress)
    return stage_evaluate(store, folders, cfg.evaluate, run / "results.json")


def format_table(results: list[dict]) -> str:
    header = (f"{'site':<14} {'method':<17} {'decoding':<10} {'K':>5} {'L0':>5} {'MSE':>10} {'FVU':>7} "
              f"{'cos':>7} {'loglik/tok':>11} {'fit s':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        fit = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") is not None else "-"
        ll = f"{r['loglik_per_token']:.5g}" if "loglik_per_token" in r else "-"
        lines.append(
            f"{r['site']:<14} {r['method']:<17} {r.get('decoding') or '-':<10} {r['n_latents']:>5} {r['l0']:>5.2f} "
            f"{r['mse']:>10.4g} {r['fvu']:>7.4f} {r['cosine']:>7.4f} {ll:>11} {fit:>7}"
        )
    return "\n".join(lines)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

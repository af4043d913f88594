"""The stages as plain functions over a run directory, and `run`, which chains them.

    runs/<name>/config.json                          the experiment config as run
    runs/<name>/store/                                activation store (see store.py)
    runs/<name>/dictionaries/<site>/kmeans-k64/       one fitted dictionary
    runs/<name>/results.json                          metrics on the eval split

A stage whose artifact exists for the same inputs is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dictlab.config import EvalConfig, ExperimentConfig, FitConfig
from dictlab.dictionaries import KMeans, load_dictionary
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


def fit_dictionaries(store: Store, cfg: FitConfig, out: Path, progress: bool = True) -> list[Path]:
    """Fit one dictionary per (site, K); a saved one with the same inputs is reused."""
    folders = []
    for site in store.sites:
        for k in cfg.k:
            folder = Path(out) / site / f"{cfg.method}-k{k}"
            inputs = {"store": _store_id(store), "site": site, "fit": cfg.model_dump(exclude={"k"}), "k": k}
            folders.append(folder)
            done = folder / "config.json"
            if done.exists() and read_json(done).get("inputs") == inputs:
                continue
            if k > store.rows("train"):
                raise DictlabError(f"k={k} is larger than the number of training rows ({store.rows('train')})")
            km = KMeans(k, n_init=cfg.n_init, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed,
                        init_sample=cfg.init_sample, batch_size=cfg.batch_size)
            start = time.perf_counter()
            km.fit(lambda: store.batches(site, "train", cfg.batch_size), progress=progress)
            seconds = time.perf_counter() - start
            km.save(folder, extra={"inputs": inputs, "site": site, "fit_seconds": seconds,
                                   "train_rows": store.rows("train")})
    return folders


def evaluate_dictionaries(store: Store, folders: list[Path], cfg: EvalConfig) -> list[dict]:
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
        metrics = evaluate_reconstruction(dictionary, store.batches(site, "eval", cfg.batch_size))
        rows.append({
            "dictionary": str(folder), "method": dictionary.kind, "site": site,
            "n_latents": dictionary.n_latents, "fit_seconds": meta.get("fit_seconds"), **metrics.as_dict(),
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
    header = f"{'site':<16} {'method':<8} {'K':>6} {'L0':>5} {'MSE':>10} {'FVU':>7} {'cos':>7} {'fit s':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        fit = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") is not None else "-"
        lines.append(
            f"{r['site']:<16} {r['method']:<8} {r['n_latents']:>6} {r['l0']:>5.2f} {r['mse']:>10.4g} "
            f"{r['fvu']:>7.4f} {r['cosine']:>7.4f} {fit:>7}"
        )
    return "\n".join(lines)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

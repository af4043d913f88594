"""The stages as plain functions over a run directory, and `run`, which chains them.

    runs/<name>/config.json                          the experiment config as run
    runs/<name>/store/                                activation store (see store.py)
    runs/<name>/dictionaries/<site>/<method>-k64/     one fitted dictionary
    runs/<name>/results.json                          metrics on the eval split, per dictionary and decoding
    runs/<name>/interpretation.json, units.html       interpretability of every dictionary (interpret_run.py)
    runs/<name>/graphs/, steering.json                co-activation graphs, steering (graphs_and_steering.py)
    runs/<name>/results.csv, report.html              the same as a table, and the report (report.py)

A stage whose artifact exists for the same inputs is skipped, so an interrupted run resumes.

Under torchrun (N processes), every rank extracts its documents and fits on its shards of the store
(k-means and EM reduce over ranks, SAEs train data-parallel); rank 0 saves the dictionaries and runs
the later stages alone while the other ranks wait. A dictionary that is not `data_parallel`
(mini-batch k-means) is fitted on rank 0.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from dictlab import distributed
from dictlab.config import EvalConfig, ExperimentConfig
from dictlab.dictionaries import (
    Dictionary,
    GaussianMixture,
    KMeans,
    MiniBatchKMeans,
    MixturePPCA,
    ResidualKMeans,
    SphericalKMeans,
    fit_many,
)
from dictlab.dictionaries.formats import load_sae
from dictlab.dictionaries.sae import SparseAutoencoder, shard_latents, unshard_latents
from dictlab.errors import DictlabError
from dictlab.evaluation import evaluate_dictionaries
from dictlab.extract import extract
from dictlab.io import config_hash, read_json, write_json
from dictlab.report import write_report
from dictlab.resources import peak_memory
from dictlab.store import Store
from dictlab.train import TrainConfig, train_sweep

log = logging.getLogger(__name__)


def run_dir(cfg: ExperimentConfig, runs_root: str | Path = "runs") -> Path:
    return Path(runs_root) / cfg.name


def store_location(cfg: ExperimentConfig, run: Path) -> str | Path:
    return cfg.store or run / "store"


def stage_extract(cfg: ExperimentConfig, run: Path, progress: bool = True) -> Store:
    return Store(extract(cfg.model, cfg.corpus, cfg.extract, store_location(cfg, run), progress=progress))


def build_dictionary(spec, size, d_in: int | None = None, d_out: int | None = None) -> Dictionary:
    """An unfitted dictionary for one entry of the `fit:` list and one of its sizes (K, or an SAE sweep member)."""
    if spec.method == "sae":
        return SparseAutoencoder(
            d_in, size["latents"], rule=spec.rule, k=size["k"], d_out=d_out, l1_coeff=size["l1_coeff"],
            l0_coeff=size["l0_coeff"],
            bandwidth=spec.bandwidth, jumprelu_init=spec.jumprelu_init, matryoshka=spec.matryoshka,
            tied=spec.tied, normalize_decoder=spec.normalize_decoder, aux_k=spec.aux_k, aux_alpha=spec.aux_alpha,
            dead_tokens=spec.dead_tokens, transcoder=spec.target_site is not None, seed=spec.seed)
    common = dict(max_iter=spec.max_iter, tol=spec.tol, seed=spec.seed, init_sample=spec.init_sample,
                  batch_size=spec.batch_size)
    if spec.method in ("kmeans", "spherical_kmeans"):
        cls = KMeans if spec.method == "kmeans" else SphericalKMeans
        return cls(size, n_init=spec.n_init, **common)
    if spec.method == "minibatch_kmeans":
        return MiniBatchKMeans(size, epochs=spec.epochs, **common)
    if spec.method == "residual_kmeans":
        return ResidualKMeans(size, stages=spec.stages, **common)
    em = dict(reg_covar=spec.reg_covar, init_iter=spec.init_iter, **common)
    if spec.method == "gmm":
        return GaussianMixture(size, covariance=spec.covariance, **em)
    return MixturePPCA(size, q=spec.q, **em)


def sae_batches(store: Store, site: str, spec, start: int = 0, world: distributed.World | None = None) -> Iterator:
    """Endless full batches of shuffled training rows, a new order each epoch; (x, y) for a transcoder.

    Starts at batch `start`: whole epochs are skipped without reading them. With `world`, this rank's
    part of each batch (batch_size / N rows) from its own shards.
    """
    columns = (spec.target_site,) if spec.target_site else ()
    size = local_batch_size(spec.batch_size, world)
    # the reader carries rows across shards, so only the epoch's last batch can be short
    per_epoch = store.rows("train", world) // size
    if per_epoch == 0:
        raise DictlabError(f"batch_size={spec.batch_size} exceeds the store's {store.rows('train', world)} training "
                           "rows" + ("" if world is None else f" of rank {world.rank} (times {world.size} ranks)"))
    epoch, skip = divmod(start, per_epoch)
    while True:
        batches = store.batches(site, "train", size, shuffle=True, seed=spec.seed + epoch, columns=columns,
                                world=world)
        full = (b for b in batches if (b["x"] if columns else b).shape[0] == size)
        for b in islice(full, skip, None):
            yield (b["x"], b[spec.target_site]) if columns else b
        epoch, skip = epoch + 1, 0


def local_batch_size(batch_size: int, world: distributed.World | None) -> int:
    """Rows of each batch that one rank holds."""
    if world is None:
        return batch_size
    if batch_size % world.size:
        raise DictlabError(f"batch_size={batch_size} does not divide among {world.size} ranks: give a multiple of "
                           f"{world.size}, so that every rank holds the same part of each batch")
    return batch_size // world.size


def _train_saes(saes: list[SparseAutoencoder], folders: list[Path], store: Store, site: str, spec,
                progress: bool, world: distributed.World | None = None) -> None:
    """Train the SAEs of one entry as a sweep sharing each batch, on this process's device. The sweep's
    checkpoint sits beside their folders, their TensorBoard logs under <run>/tensorboard/<site>/<name>."""
    device = distributed.device()
    cfg = TrainConfig(steps=spec.steps, lr=spec.lr, warmup_steps=spec.warmup_steps, decay_start=spec.decay_start,
                      sparsity_warmup_steps=spec.sparsity_warmup_steps, grad_clip=spec.grad_clip, seed=spec.seed,
                      autocast="bfloat16" if spec.gpu_bf16 and device.type == "cuda" else None)
    run = folders[0].parent.parent.parent
    name = folders[0].name + (f"-and-{len(folders) - 1}-more" if len(folders) > 1 else "")
    if world is not None and spec.shard_latents:  # every rank holds a slice of each SAE's latents, takes whole batches
        saes = [shard_latents(sae, world) for sae in saes]
        world = None
    histories = train_sweep(saes, lambda start: sae_batches(store, site, spec, start, world), cfg, progress,
                            log_every=spec.log_every, checkpoint=folders[0].with_name(f".{name}.checkpoint.pt"),
                            checkpoint_every=spec.checkpoint_every,
                            tensorboard=[run / "tensorboard" / site / f.name for f in folders],
                            wandb_project=spec.wandb_project, wandb_dir=run, run_name=f"{site}/{name}",
                            names=[f.name for f in folders], world=world, device=device)
    for sae, history in zip(saes, histories):
        unshard_latents(sae).to("cpu")
        sae.history_ = history


def fit_dictionaries(store: Store, specs: list, out: Path, progress: bool = True, eval_only: bool = False,
                     seeds: list[int] | None = None, world: distributed.World | None = None) -> list[Path]:
    """Fit one dictionary per (method entry, site, size[, seed]); a saved one with the same inputs is reused.

    Lloyd and spherical k-means fit all their K in shared passes over the store; the SAEs of one entry
    (its widths, and the k or coefficients it sweeps) train together on each batch. With `seeds`,
    every entry is fitted once per seed, into folders ending in -s<seed>. With `eval_only`, nothing
    is fitted: a dictionary these settings did not produce yet is an error. With `world`, every rank
    calls this and fits on its shards; rank 0 saves.
    """
    folders, writers = [], {}
    for i, spec in enumerate(specs):
        only = getattr(spec, "site", None)
        target = getattr(spec, "target_site", None)
        for s in (only, target):
            if s is not None and s not in store.sites:
                raise DictlabError(f"site {s!r} is not in the store; it holds: {', '.join(store.sites)}")
        for site in [only] if only else list(store.sites):
            for size in spec.sizes():
                where = f"{site}/{folder_name(spec, size)}"
                if writers.setdefault(where, i) != i:
                    raise DictlabError(f"fit entries {writers[where]} and {i} (counting from 0) both write {where}: "
                                       "give one of them a `name:`")
    for spec in specs:
        only = getattr(spec, "site", None)
        for seed in (seeds if spec.method != "pretrained" else None) or [None]:
            seeded = spec if seed is None else spec.model_copy(update={"seed": seed})
            suffix = "" if seed is None else f"-s{seed}"
            for site in [only] if only else list(store.sites):
                folders += _fit_entry(store, seeded, site, Path(out), progress, eval_only, suffix, world)
    return folders


def folder_name(spec, size) -> str:
    """The folder of one dictionary of an entry: its method's name for the size, then the entry's `name`."""
    name = getattr(spec, "name", None)
    return spec.folder(size) + (f"-{name}" if name else "")


def _fit_entry(store: Store, spec, site: str, out: Path, progress: bool, eval_only: bool = False,
               suffix: str = "", world: distributed.World | None = None) -> list[Path]:
    main = distributed.is_main(world)
    if spec.method == "pretrained":
        return _import_pretrained(store, spec, site, out, eval_only) if main else []
    folders, todo = [], []
    target = getattr(spec, "target_site", None)
    for size in spec.sizes():
        folder = out / site / (folder_name(spec, size) + suffix)
        folders.append(folder)
        inputs = _missing(store, spec, site, size, folder, eval_only)
        if inputs is None:
            continue
        if spec.method != "sae" and size > store.rows("train"):
            raise DictlabError(f"k={size} is larger than the number of training rows ({store.rows('train')})")
        d_out = store.d_model(target) if target else None
        todo.append((build_dictionary(spec, size, store.d_model(site), d_out), folder, inputs))
    parallel = all(d.data_parallel for d, _, _ in todo)
    if not todo or not (parallel or main):
        return folders
    if not parallel:
        world = None  # fitted on rank 0 alone
    batches = store.source(site, "train", spec.batch_size, world)
    costs = _fit_todo(todo, store, site, spec, batches, progress, world)
    if not main:
        return folders
    for (d, folder, inputs), cost in zip(todo, costs):
        extra = {"inputs": inputs, "site": site, "train_rows": store.rows("train"), **cost}
        if world is not None:
            extra["ranks"] = world.size
        if target:
            extra["target_site"] = target
        if hasattr(d, "history_"):
            extra["training"] = d.history_
        d.save(folder, extra=extra)
    return folders


def _missing(store: Store, spec, site: str, size, folder: Path, eval_only: bool) -> dict | None:
    """The inputs a dictionary's folder must record, or None when it already holds them (done).
    With `eval_only`, a folder still to do is an error."""
    inputs = {"store": store.identity, "site": site, "fit": spec.model_dump(), "size": size}
    done = folder / "config.json"
    if done.exists() and read_json(done).get("inputs") == inputs:
        return None
    if eval_only:
        raise DictlabError(f"{folder} was not fitted with these settings; run without --eval-only first")
    return inputs


def _import_pretrained(store: Store, spec, site: str, out: Path, eval_only: bool) -> list[Path]:
    """Save each published SAE into the dictionaries folder, so it is evaluated like the others. A source
    that cannot be loaded (no hub, say) is skipped with a warning unless the entry is `required`."""
    folders = []
    for source in spec.sources:
        folder = out / site / folder_name(spec, source)
        inputs = _missing(store, spec, site, source, folder, eval_only)
        if inputs is None:
            folders.append(folder)
            continue
        try:
            sae = load_sae(source)
        except DictlabError as e:
            if spec.required:
                raise
            log.warning("skipping pretrained SAE %s: %s", source, e)
            continue
        widths = ((site, sae.d_in), (spec.target_site or site, sae.d_model))
        for s, width in widths:
            if width != store.d_model(s):
                raise DictlabError(f"pretrained SAE {source} has width {width} at {s}, the store {store.d_model(s)}")
        extra = {"inputs": inputs, "site": site, "source": source}
        if spec.target_site:
            extra["target_site"] = spec.target_site
        sae.save(folder, extra=extra)
        folders.append(folder)
    return folders


def _fit_todo(todo: list, store: Store, site: str, spec, batches, progress: bool,
              world: distributed.World | None = None) -> list[dict]:
    """Fit what `_fit_entry` found missing; returns each one's fit_seconds and peak memory. Dictionaries
    fitted in shared passes (k-means K, an SAE sweep) share one peak and split the time evenly."""
    start = time.perf_counter()
    if spec.method in ("kmeans", "spherical_kmeans", "sae"):
        with peak_memory() as memory:
            if spec.method == "sae":
                _train_saes([d for d, _, _ in todo], [f for _, f, _ in todo], store, site, spec, progress, world)
            else:
                fit_many([d for d, _, _ in todo], batches, progress)
        seconds = (time.perf_counter() - start) / len(todo)
        return [{"fit_seconds": seconds, **_prefixed(memory)}] * len(todo)
    costs = []
    for d, _, _ in todo:
        t = time.perf_counter()
        with peak_memory() as memory:
            if spec.method == "minibatch_kmeans":
                d.fit(batches, progress, shuffled=lambda e: store.batches(
                    site, "train", spec.batch_size, shuffle=True, seed=spec.seed + e))
            else:
                d.fit(batches, progress)
        costs.append({"fit_seconds": time.perf_counter() - t, **_prefixed(memory)})
    return costs


def _prefixed(memory: dict) -> dict:
    return {f"fit_{k}": v for k, v in memory.items()}


def stage_evaluate(store: Store, folders: list[Path], cfg: EvalConfig, out: Path, progress: bool = False) -> list[dict]:
    inputs = {
        "store": store.identity, "eval": cfg.model_dump(),
        "dictionaries": [config_hash(read_json(Path(f) / "config.json")) for f in folders],
    }
    if out.exists():
        previous = read_json(out)
        if previous.get("inputs") == inputs:
            return previous["results"]
    results = evaluate_dictionaries(store, folders, cfg, progress)
    write_json(out, {"inputs": inputs, "eval_rows": store.rows("eval"), "results": results})
    return results


def planned_folders(cfg: ExperimentConfig) -> list[str]:
    """SITE/FOLDER of every dictionary the run will fit, known before anything runs."""
    from dictlab.extract import resolve_sites

    sites = [s.name for s in resolve_sites(cfg.extract)]
    names = []
    for spec in cfg.fit:
        seeds = (cfg.seeds if spec.method != "pretrained" else None) or [None]
        for site in [spec.site] if getattr(spec, "site", None) else sites:
            for size in spec.sizes():
                names += [f"{site}/{folder_name(spec, size)}" + ("" if s is None else f"-s{s}") for s in seeds]
    return names


def run_experiment(cfg: ExperimentConfig, runs_root: str | Path = "runs", progress: bool = True) -> list[dict]:
    """Every stage of a run; under torchrun, call it on every rank (rank 0 returns the results, the
    others an empty list once rank 0 is done)."""
    from dictlab.graphs_and_steering import check_names

    check_names(cfg.graph, cfg.steer, planned_folders(cfg))
    world = distributed.current()
    run = run_dir(cfg, runs_root)
    run.mkdir(parents=True, exist_ok=True)
    if distributed.is_main(world) and (
            not (run / "config.json").exists() or read_json(run / "config.json") != cfg.model_dump()):
        write_json(run / "config.json", cfg.model_dump())
    store = stage_extract(cfg, run, progress)
    folders = fit_dictionaries(store, cfg.fit, run / "dictionaries", progress, seeds=cfg.seeds, world=world)
    if not distributed.is_main(world):
        world.barrier()  # rank 0 evaluates, interprets and reports
        return []
    results = _later_stages(cfg, run, store, folders, progress)
    if world is not None:
        world.barrier()
    return results


def _later_stages(cfg: ExperimentConfig, run: Path, store: Store, folders: list[Path], progress: bool) -> list[dict]:
    from dictlab.graphs_and_steering import graph_stage, steer_stage

    results = stage_evaluate(store, folders, cfg.evaluate, run / "results.json", progress)
    if cfg.interpret.enabled:
        from dictlab.interpret_run import interpret_run

        interpret_run(store, folders, cfg.interpret, run / "interpretation.json", cfg.evaluate.batch_size, progress)
    graph_stage(run, store, cfg.graph, cfg.steer, progress)
    steer_stage(run, store, cfg.steer, progress)
    stage_report(run)
    return results


def stage_report(run: Path) -> None:
    """Write report.html and results.csv (and units.html) unless they are newer than their inputs."""
    outputs = [run / "report.html", run / "results.csv"]
    inputs = [p for p in (run / "results.json", run / "config.json", run / "interpretation.json",
                          run / "steering.json", *(run / "graphs").glob("*/summary.json")) if p.exists()]
    if (run / "interpretation.json").exists():
        outputs.append(run / "units.html")
    newest_input = max(p.stat().st_mtime_ns for p in inputs)
    if not all(p.exists() and p.stat().st_mtime_ns > newest_input for p in outputs):
        write_report(run)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

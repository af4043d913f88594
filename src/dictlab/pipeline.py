"""The stages as plain functions over a run directory, `run_experiment`, which chains them, and
`converge`, the cross-model comparison with its report.

    runs/<name>/config.json                          the experiment config as run
    runs/<name>/store/                                activation store (data/store.py)
    runs/<name>/dictionaries/<site>/<method>-k64/     one fitted dictionary (dictionaries/fitting.py)
    runs/<name>/results.json                          metrics on the eval split, per dictionary and decoding
    runs/<name>/interpretation.json, units.html       interpretability of every dictionary (interpret/stage.py)
    runs/<name>/graphs/, steering.json                co-activation graphs, steering (analyses/stages.py)
    runs/<name>/results.csv, report.html              the same as a table, and the report (report/run_report.py)
    runs/<name>/stage_seconds.json                    wall seconds of each stage in the last `run` (a skipped
                                                      stage counts its check)

A stage whose artifact exists for the same inputs is skipped, so an interrupted run resumes.

Under torchrun (N processes), every rank extracts its documents and fits on its shards of the store
(k-means and EM reduce over ranks, SAEs train data-parallel); rank 0 saves the dictionaries and runs
the later stages alone while the other ranks wait. A dictionary that is not `data_parallel`
(mini-batch k-means) is fitted on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

from dictlab.analyses.stages import check_names, graph_stage, steer_stage
from dictlab.config import ConvergeConfig, ExperimentConfig
from dictlab.data import distributed
from dictlab.data.extract import extract, resolve_sites
from dictlab.data.io import config_hash, read_json, write_json
from dictlab.data.lock import folder_lock
from dictlab.data.store import Store
from dictlab.dictionaries import fitting
from dictlab.dictionaries.fitting import fit_dictionaries
from dictlab.errors import DictlabError
from dictlab.interpret.stage import interpret_run
from dictlab.measures.evaluation import EvalConfig, evaluate_dictionaries
from dictlab.report.cards import write_dictionary_cards
from dictlab.report.graphs_and_steering import draw_graph
from dictlab.report.run_report import write_report


def run_dir(cfg: ExperimentConfig, runs_root: str | Path = "runs") -> Path:
    return Path(runs_root) / cfg.name


def store_location(cfg: ExperimentConfig, run: Path) -> str | Path:
    return cfg.store or run / "store"


def stage_extract(cfg: ExperimentConfig, run: Path, progress: bool = True) -> Store:
    return Store(extract(cfg.model_spec, cfg.corpus, cfg.extract, store_location(cfg, run), progress=progress))


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
    write_json(out, {"inputs": inputs, "eval_rows": store.rows("eval"), "results": results,
                     "store_manifest_sha256": store.loc.sha256("manifest.json")})
    return results


def planned_folders(cfg: ExperimentConfig) -> dict[str, str | None]:
    """SITE/FOLDER of every dictionary the run will fit, known before anything runs (each with the site it
    reconstructs when that is another one)."""
    return fitting.planned_folders(cfg.fit, [s.name for s in resolve_sites(cfg.extract)], cfg.seeds)


def run_experiment(cfg: ExperimentConfig, runs_root: str | Path = "runs", progress: bool = True) -> list[dict]:
    """Every stage of a run; under torchrun, call it on every rank (rank 0 returns the results, the
    others an empty list once rank 0 is done)."""
    check_names(cfg.graph, cfg.steer, planned_folders(cfg))
    world = distributed.current()
    run = run_dir(cfg, runs_root)
    _refuse_other_control(run, cfg)
    with contextlib.ExitStack() as locks:  # one writer per run folder and store (data/lock.py)
        if distributed.is_main(world):
            for folder in dict.fromkeys([str(run), str(store_location(cfg, run))]):
                locks.enter_context(folder_lock(folder, f"dictlab run ({cfg.name})"))
        run.mkdir(parents=True, exist_ok=True)
        if distributed.is_main(world) and (
                not (run / "config.json").exists() or read_json(run / "config.json") != cfg.model_dump()):
            write_json(run / "config.json", cfg.model_dump())
        clock = _StageClock(run / "stage_seconds.json", distributed.is_main(world))
        with clock("extract"):
            store = stage_extract(cfg, run, progress)
        with clock("fit"):
            folders = fit_dictionaries(store, cfg.fit, run / "dictionaries", progress, seeds=cfg.seeds,
                                       world=world)
        if not distributed.is_main(world):
            world.barrier()  # rank 0 evaluates, interprets and reports
            return []
        results = _later_stages(cfg, run, store, folders, progress, clock)
        if world is not None:
            world.barrier()
        return results


def _refuse_other_control(run: Path, cfg: ExperimentConfig) -> None:
    """A control run must not write over the trained run's folders (nor the reverse)."""
    if not (run / "config.json").exists():
        return
    found = read_json(run / "config.json").get("control")
    if found != cfg.control:
        what = {None: "the trained model", "random_weights": "the random-weights control"}
        raise DictlabError(f"{run} holds a run on {what.get(found, found)}; this config asks for "
                           f"{what.get(cfg.control, cfg.control)}: give it another name (e.g. {cfg.name}-control)")


class _StageClock:
    """`with clock("fit"):` adds the stage's wall seconds to stage_seconds.json (rank 0 writes it)."""

    def __init__(self, path: Path, main: bool):
        self.path, self.main, self.seconds = path, main, {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 2)
        if self.main:
            write_json(self.path, self.seconds)


def _later_stages(cfg: ExperimentConfig, run: Path, store: Store, folders: list[Path], progress: bool,
                  clock: _StageClock) -> list[dict]:
    with clock("evaluate"):
        results = stage_evaluate(store, folders, cfg.evaluate, run / "results.json", progress)
    if cfg.interpret.enabled:
        with clock("interpret"):
            interpret_run(store, folders, cfg.interpret, run / "interpretation.json", cfg.evaluate.batch_size,
                          progress)
            for folder in folders:
                write_dictionary_cards(folder)
    with clock("graph"):
        for folder in graph_stage(run, store, cfg.graph, cfg.steer, progress):
            draw_graph(folder)
    with clock("steer"):
        steer_stage(run, store, cfg.steer, progress)
    with clock("report"):
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


def converge(cfg: ConvergeConfig, runs_root: str | Path = "runs", progress: bool = True) -> dict:
    """`dictlab converge`: the comparison (or what an earlier run left of it), then its report."""
    from dictlab.analyses.convergence.run import run_convergence
    from dictlab.report.convergence import write_convergence_report

    out = run_convergence(cfg, runs_root, progress)
    write_convergence_report(Path(runs_root) / cfg.name)
    return out


def quick(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same experiment, smaller (`--quick`): for a first look in a few minutes, in RUNS_DIR/NAME-quick."""
    data = cfg.model_dump()
    data["name"] += "-quick"
    ex = data["extract"]
    ex["train_tokens"], ex["eval_tokens"] = min(ex["train_tokens"], 20_000), min(ex["eval_tokens"], 4_000)
    data["fit"] = _quick_fits(e.first_sizes(2) for e in cfg.fit)
    ev = data["evaluate"]
    ev["ce_contexts"], ev["cluster_sample"] = min(ev["ce_contexts"], 2), min(ev["cluster_sample"], 2000)
    it = data["interpret"]
    it["n_top"], it["per_interval"] = min(it["n_top"], 5), min(it["per_interval"], 1)
    st = data["steer"]
    st["contexts"], st["new_tokens"] = min(st["contexts"], 4), min(st["new_tokens"], 5)
    st["n_units"] = min(st["n_units"], 2)
    st["alphas"] = st["alphas"][-1:]
    return ExperimentConfig.model_validate(data)


def smoke_test(cfg: ExperimentConfig) -> ExperimentConfig:
    """`fit --quick-test`: every fitted entry capped at 200 SAE steps of at most 1024 rows and 5 Lloyd/EM iterations."""
    return cfg.model_copy(update={"fit": [e.capped(steps=200, iterations=5) for e in cfg.fit]})


def quick_convergence(cfg: ConvergeConfig) -> ConvergeConfig:
    """The same comparison, smaller (`converge --quick`): a smoke test of every level in a few minutes."""
    data = cfg.model_dump()
    data["name"] += "-quick"
    data["text"].update(documents=min(data["text"]["documents"], 16), positions=min(data["text"]["positions"], 8))
    rep = data["representation"]
    rep["positions"], rep["rsa_positions"] = None, min(rep["rsa_positions"], 4)
    data["behaviour"].update(prompts_per_suite=2, new_tokens=min(data["behaviour"]["new_tokens"], 8))
    data["dictionaries"]["train_tokens"] = min(data["dictionaries"]["train_tokens"], 10_000)
    data["statistics"].update(permutations=min(data["statistics"]["permutations"], 20),
                              half_samples=min(data["statistics"]["half_samples"], 10),
                              bootstrap=min(data["statistics"]["bootstrap"], 200))
    data["dictionaries"]["fit"] = _quick_fits(cfg.dictionaries.fit)
    for model, m in zip(data["models"], cfg.models):
        if m.fit is not None:
            model["fit"] = _quick_fits(m.fit)
    return ConvergeConfig.model_validate(data)


def _quick_fits(entries) -> list[dict]:
    """Fit entries as --quick runs them: 40 SAE steps, 10 Lloyd/EM iterations, small samples, little logging."""
    return [e.capped(steps=40, iterations=10, light=True).model_dump() for e in entries]


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)

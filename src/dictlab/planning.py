"""`dictlab plan CONFIG`: what a run will cost, stage by stage, before it runs; and the disk check
`dictlab run` makes before it starts.

The plan runs every stage in miniature in a temporary folder and scales what it measures, each
stage as a fixed part plus a part proportional to its work, the two told apart by probes of two
sizes:
  extract    the real extraction of a quarter of PROBE_ROWS and of PROBE_ROWS train rows: the
             difference is the cost per row; disk from the bytes per row of the probe store
  fit        SAEs: 2 and 6 steps (`steps: auto`: scaled to its budget, an upper bound). Lloyd/EM:
             1 and 2 passes (the cost of a pass, and the fixed part, scaled by the init sample), then
             a fit with the entry's own tolerance on the probe store (its passes, scaled by train
             rows: as many passes are assumed as it took)
  evaluate   without CE (scaled by eval rows), then with one CE batch (the difference, times the
             CE batches)
  interpret  every dictionary on the probe store's eval split and on the half as large one of the
             small probe store: the difference is the cost per eval row (splitting and absorption
             included)
  graph      on the probe store, scaled by eval rows
  steer      one unit, one context, with one and with two αs: the cost of a (unit, α, context),
             times their number, plus the rest
Peak RAM is the largest resident set measured in the stage's probes (the model included); device
memory likewise when CUDA is used. Nothing is written outside the temporary folder.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dictlab import pipeline
from dictlab.analyses.stages import check_names, graph_stage, steer_stage
from dictlab.config import ExperimentConfig
from dictlab.data.extract import extract
from dictlab.data.extract import store_bytes as extract_store_bytes
from dictlab.data.lm import shared_model
from dictlab.data.placement import contexts_per_batch
from dictlab.data.resources import peak_memory
from dictlab.data.store import Store
from dictlab.dictionaries.fitting import fit_dictionaries
from dictlab.errors import DictlabError
from dictlab.interpret.stage import interpret_run
from dictlab.measures.evaluation import evaluate_dictionaries

PROBE_ROWS = 16_384  # train rows of the probe store (more when an entry needs them: K, SAE batch)


@dataclass
class StagePlan:
    stage: str
    seconds: float
    disk_bytes: int
    peak_ram_bytes: int
    device_bytes: int | None
    basis: str


def _measured(fn):
    """(seconds, peak RSS bytes, peak CUDA bytes or None, result) of fn()."""
    with peak_memory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    cuda = memory.get("peak_cuda_mb")
    return seconds, int(memory["peak_rss_mb"] * 2**20), None if cuda is None else int(cuda * 2**20), result


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _probe_rows(cfg: ExperimentConfig) -> int:
    need = PROBE_ROWS
    for spec in cfg.fit:
        for size in spec.sizes():
            need = max(need, 4 * size if isinstance(size, int) else 0)
        need = max(need, 2 * getattr(spec, "batch_size", 0))
    return min(need, cfg.extract.train_tokens)


def _extract(cfg: ExperimentConfig, run: Path) -> None:
    extract(cfg.model_spec, cfg.corpus, cfg.extract, run / "store", False)


def _ce_batch(cfg: ExperimentConfig) -> int:
    """Contexts per CE forward pass, as the run will take them (an "auto" resolved on this machine)."""
    model, _ = shared_model(cfg.model_spec, cfg.extract.model_dtype)
    return contexts_per_batch(model, cfg.extract.context_length, cfg.evaluate.ce_batch_size)


def _probe_config(cfg: ExperimentConfig, train_rows: int, eval_share: float = 1.0) -> ExperimentConfig:
    contexts = max(_ce_batch(cfg), 2)
    eval_rows = min(cfg.extract.eval_tokens, max(4096, 2 * contexts * cfg.extract.context_length))
    eval_rows = max(int(eval_rows * eval_share), cfg.extract.context_length)
    extract_cfg = cfg.extract.model_copy(update={"train_tokens": train_rows, "eval_tokens": eval_rows})
    return cfg.model_copy(update={"extract": extract_cfg})


def plan_run(cfg: ExperimentConfig, progress: bool = False) -> list[StagePlan]:
    """The predicted cost of `dictlab run` for this config (see the module's docstring)."""
    check_names(cfg.graph, cfg.steer, pipeline.planned_folders(cfg))
    rows: list[StagePlan] = []
    train, evals = cfg.extract.train_tokens, cfg.extract.eval_tokens
    with tempfile.TemporaryDirectory(prefix="dictlab-plan-") as tmp:
        tmp = Path(tmp)
        say = (lambda what: print(f"dictlab plan: {what}", file=sys.stderr)) if progress else (lambda what: None)
        say("loading the model")
        load_s, load_ram, load_dev, _ = _measured(lambda: shared_model(cfg.model_spec, cfg.extract.model_dtype))
        say("extracting two probe stores")
        probe_train = _probe_rows(cfg)
        small_cfg = _probe_config(cfg, probe_train // 4, eval_share=0.5)
        small, small_ram, _, _ = _measured(lambda: _extract(small_cfg, tmp / "small"))
        small_store = Store(tmp / "small" / "store")
        small_rows = small_store.rows("train") + small_store.rows("eval")
        run = tmp / "run"
        s, ram, dev, _ = _measured(lambda: _extract(_probe_config(cfg, probe_train), run))
        store = Store(run / "store")
        probe_eval = store.rows("eval")
        probe_rows = store.rows("train") + probe_eval
        per_row = max(s - small, 0.0) / max(probe_rows - small_rows, 1)
        fixed = max(small - small_rows * per_row, 0.0)
        scale = (train + evals) / probe_rows
        rows.append(StagePlan("extract", load_s + fixed + per_row * (train + evals),
                              int(_folder_bytes(run / "store") * scale), max(load_ram, small_ram, ram), dev or load_dev,
                              f"model load + {small_rows:,} and {probe_rows:,} rows extracted; {train + evals:,} rows"))
        say(f"fitting each of {len(cfg.fit)} entries on {store.rows('train'):,} rows")
        rows += _plan_fits(cfg, store, run / "dictionaries", tmp / "short", train)
        say("evaluating, interpreting, graphs and steering on the probe store")
        folders = [run / "dictionaries" / name for name in pipeline.planned_folders(cfg)]
        rows.append(_plan_evaluate(cfg, store, folders, evals / probe_eval))
        if cfg.interpret.enabled:
            rows.append(_plan_interpret(cfg, store, small_store, folders, run))
        s, ram, dev, _ = _measured(lambda: graph_stage(run, store, cfg.graph, cfg.steer, False))
        rows.append(StagePlan("graph", s * evals / probe_eval, _folder_bytes(run / "graphs"), ram, dev,
                              f"on {probe_eval:,} eval rows, x{evals / probe_eval:.1f}"))
        rows.append(_plan_steer(cfg, run, store))
    return rows


def _plan_fits(cfg: ExperimentConfig, store: Store, out: Path, scratch: Path, train: int) -> list[StagePlan]:
    rows = []
    probe_train = store.rows("train")

    def fit(spec, where):
        return _measured(lambda: fit_dictionaries(store, [spec], where, False, seeds=cfg.seeds))

    for i, spec in enumerate(cfg.fit):
        field, passes = spec.work_field, spec.work_is_passes
        first, second = (1, 2) if passes else (2, 6)
        t1, ram1, dev1, _ = fit(spec.with_work(first), scratch / "first")
        last = spec if passes else spec.with_work(second)
        if passes:
            t2, _, _, _ = fit(spec.with_work(second), scratch / "second")
        before = set(out.rglob("config.json")) if out.exists() else set()
        t_last, ram2, dev2, _ = fit(last, out)
        disk = sum(_folder_bytes(f.parent) for f in set(out.rglob("config.json")) - before)
        if field and not passes:
            per_unit = max(t_last - t1, 0.0) / (second - first)
            work = spec.most_work()
            bound = "" if work == getattr(spec, field) else "at most "  # it stops on its own rule before
            basis = f"{first} and {second} {field} timed; {bound}{work} {field}"
            seconds = max(t1 - first * per_unit, 0.0) + per_unit * work
        elif field:
            fixed = max(2 * t1 - t2, 0.0)  # t1 = fixed + one pass, t2 = fixed + two
            sample = getattr(spec, "init_sample", probe_train)
            seconds = (fixed * min(sample, train) / min(sample, probe_train)
                       + max(t_last - fixed, 0.0) * train / probe_train)
            basis = (f"1 and 2 passes, and a fit to its tolerance, on {probe_train:,} rows; "
                     f"passes x{train / probe_train:.1f}")
        else:
            seconds, basis = t_last, "imported, timed as is"
        label = getattr(spec, "method", "fit") + (f" [{i}]" if len(cfg.fit) > 1 else "")
        rows.append(StagePlan(f"fit {label}", seconds, disk, max(ram1, ram2), dev2 or dev1, basis))
    return rows


def _plan_interpret(cfg: ExperimentConfig, store: Store, small: Store, folders: list[Path], run: Path) -> StagePlan:
    def timed(where: Store, out: Path):
        return _measured(lambda: interpret_run(where, folders, cfg.interpret, out, cfg.evaluate.batch_size, False))

    split = cfg.interpret.split
    rows, small_rows = store.rows(split), small.rows(split)
    t_small, ram_small, dev_small, _ = timed(small, run / "interpretation-small.json")
    t, ram, dev, _ = timed(store, run / "interpretation.json")
    per_row = max(t - t_small, 0.0) / max(rows - small_rows, 1)
    fixed = max(t - per_row * rows, 0.0)
    target = cfg.extract.eval_tokens if split == "eval" else cfg.extract.train_tokens
    return StagePlan("interpret", fixed + per_row * target, 0, max(ram, ram_small), dev or dev_small,
                     f"all {len(folders)} dictionaries on {small_rows:,} and {rows:,} {split} rows; {target:,} rows")


def _plan_evaluate(cfg: ExperimentConfig, store: Store, folders: list[Path], eval_scale: float) -> StagePlan:
    e = cfg.evaluate
    s0, ram0, dev0, _ = _measured(
        lambda: evaluate_dictionaries(store, folders, e.model_copy(update={"ce_contexts": 0})))
    seconds, basis = s0 * eval_scale, f"without CE x{eval_scale:.1f}"
    ram, dev = ram0, dev0
    if e.ce_contexts:
        size = _ce_batch(cfg)
        one = e.model_copy(update={"ce_contexts": min(size, e.ce_contexts), "ce_batch_size": size})
        s1, ram, dev, _ = _measured(lambda: evaluate_dictionaries(store, folders, one))
        batches = math.ceil(e.ce_contexts / size)
        seconds += max(s1 - s0, 0.0) * batches
        basis += f"; one CE batch timed, x{batches}"
    return StagePlan("evaluate", seconds, 0, max(ram0, ram), dev or dev0, basis)


def _plan_steer(cfg: ExperimentConfig, run: Path, store: Store) -> StagePlan:
    steer = cfg.steer
    if steer.dictionary is None:
        return StagePlan("steer", 0.0, 0, 0, None, "no steering configured")
    units = len(steer.units) if steer.units else steer.n_units
    one = steer.model_copy(update={"n_units": 1, "units": steer.units[:1] if steer.units else None,
                                   "alphas": steer.alphas[:1], "contexts": 1})
    two = one.model_copy(update={"alphas": [steer.alphas[0], steer.alphas[0] / 2]})
    t1, ram1, dev1, _ = _measured(lambda: steer_stage(run, store, one, False))
    t2, ram2, dev2, _ = _measured(lambda: steer_stage(run, store, two, False))
    each = max(t2 - t1, 0.0)
    factor = units * len(steer.alphas) * steer.contexts
    return StagePlan("steer", max(t1 - each, 0.0) + each * factor, 0, max(ram1, ram2), dev2 or dev1,
                     f"1 unit, 1 context, 1 and 2 αs timed; x{factor} (units x αs x contexts)")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_plan(rows: list[StagePlan]) -> str:
    header = f"{'stage':<22} {'time':>9} {'disk':>9} {'peak RAM':>9} {'device':>9}  basis"
    lines = [header, "-" * len(header)]
    for r in rows:
        device = "-" if r.device_bytes is None else _size(r.device_bytes)
        lines.append(f"{r.stage:<22} {r.seconds / 60:>7.1f} m {_size(r.disk_bytes):>9} {_size(r.peak_ram_bytes):>9} "
                     f"{device:>9}  {r.basis}")
    total_s = sum(r.seconds for r in rows)
    peak = max((r.peak_ram_bytes for r in rows), default=0)
    lines.append(f"{'total':<22} {total_s / 60:>7.1f} m {_size(sum(r.disk_bytes for r in rows)):>9} "
                 f"{_size(peak):>9}")
    return "\n".join(lines)


def store_bytes(cfg: ExperimentConfig, d_model: int) -> int:
    """Bytes the run's store will take (extract.store_bytes of its extract settings)."""
    return extract_store_bytes(cfg.extract, d_model)


def check_disk(cfg: ExperimentConfig, run: Path, force: bool = False) -> str:
    """Refuse (DictlabError, one line) when the store's disk cannot hold what is still to be written;
    returns the line `dictlab run` prints. Remote stores (fsspec URLs) are not checked."""
    location = pipeline.store_location(cfg, run)
    if "://" in str(location):
        return f"store at {location}: its free space is not checked"
    model, _ = shared_model(cfg.model_spec, cfg.extract.model_dtype)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    location = Path(location)
    needed = max(store_bytes(cfg, config.hidden_size) - (_folder_bytes(location) if location.exists() else 0), 0)
    existing = next(p for p in (location, *location.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    line = f"the store needs {needed:,} more bytes at {location}; {free:,} are free"
    if needed > free and not force:
        raise DictlabError(f"not enough disk: {line} (free some space, set `store:` elsewhere, or pass --force)")
    return line

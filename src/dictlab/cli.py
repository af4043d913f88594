"""`dictlab` command line: a thin layer over the stage functions in pipeline.py."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from dictlab.config import ExperimentConfig, _explain, load_config
from dictlab.errors import DictlabError

DESCRIPTION = """\
dictlab learns dictionaries (k-means family, mixtures, sparse autoencoders, transcoders) over a language
model's activations and compares them on held-out data.

  dictlab run configs/demo.yaml          extract -> fit -> evaluate -> interpret -> report, skipping finished stages;
                                         --quick: a smaller version of the same run (RUN-quick)
  dictlab extract configs/demo.yaml      only build the activation store
  dictlab fit configs/demo.yaml          only fit (needs the store); --quick-test, --eval-only
  dictlab evaluate --store S DICT...     score saved dictionaries on the store's eval split
  dictlab interpret --store S DICT...    per unit: top and sampled contexts, frequency, logit lens
  dictlab graph --store S DICT [DICT_B]  co-activation graph of units, within a site or across sites/layers
  dictlab steer DICT --store S --units U steer the model with units; ablate units
  dictlab converge CONFIG                do two models learn the same things? (behaviour, layers, units)
  dictlab report runs/demo               the HTML report (and results.csv) of a run
  dictlab store info|verify STORE        counts, dtype, sizes; re-check every shard's sha256
"""


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _config(args) -> ExperimentConfig:
    """The config file (or the defaults), with the command-line overrides applied and re-validated."""
    cfg = load_config(args.config) if args.config else ExperimentConfig(name="adhoc")
    data = cfg.model_dump()
    overrides = {
        ("model",): getattr(args, "model", None),
        ("corpus", "source"): getattr(args, "corpus", None),
        ("extract", "layers"): getattr(args, "layers", None),
        ("extract", "sites"): getattr(args, "sites", None),
        ("extract", "train_tokens"): getattr(args, "train_tokens", None),
        ("extract", "eval_tokens"): getattr(args, "eval_tokens", None),
        ("extract", "context_length"): getattr(args, "context_length", None),
        ("extract", "batch_size"): getattr(args, "batch_size", None),
    }
    if getattr(args, "method", None):
        data["fit"] = [{"method": args.method}]
    fitted = lambda e: e.get("method") not in ("sae", "pretrained")  # noqa: E731
    for key, applies in (("k", fitted), ("latents", lambda e: e.get("method") == "sae"),
                         ("max_iter", fitted), ("seed", lambda e: e.get("method") != "pretrained")):
        if getattr(args, key, None) is not None:
            for entry in data["fit"]:
                if applies(entry):
                    entry[key] = getattr(args, key)
    if getattr(args, "quick_test", False):  # a few hundred steps, a few iterations: a smoke test
        _shrink_fits(data["fit"], sae_steps=200, sae_warmup=20, iters=5)
    for path, value in overrides.items():
        if value is not None:
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise DictlabError(_explain(e, ExperimentConfig, "command line")) from e


def _add_extract_flags(p):
    p.add_argument("--model", help="embedded alias (gemma3-270m), local model folder, or hub id")
    p.add_argument("--corpus", help="'embedded', 'hub:NAME', or a .txt/.jsonl/.jsonl.zst/.parquet file or folder")
    p.add_argument("--layers", type=_ints, help="comma-separated layer indices, e.g. 4,8,12")
    p.add_argument("--sites", type=_strs,
                   help="comma-separated: resid_pre, resid_mid, resid_post, attn_out, mlp_out, or full names "
                        "(L12.resid_post, blocks.12.hook_resid_post, model.layers.12.mlp)")
    p.add_argument("--train-tokens", type=int, help="rows to store for the train split")
    p.add_argument("--eval-tokens", type=int, help="rows to store for the eval split")
    p.add_argument("--context-length", type=int, help="tokens per context, BOS included (default 128)")
    p.add_argument("--batch-size", type=int, help="contexts per forward pass")


def _add_fit_flags(p):
    from dictlab.config import FIT_METHODS

    p.add_argument("--method", choices=list(FIT_METHODS),
                   help="fit only this method (with its defaults) instead of the config's fit list")
    p.add_argument("--k", type=_ints, help="comma-separated K (clusters or components), for every non-SAE entry")
    p.add_argument("--latents", type=_ints, help="comma-separated SAE widths, for every SAE entry")
    p.add_argument("--max-iter", type=int, help="Lloyd / EM iterations at most")
    p.add_argument("--seed", type=int, help="seed of the init")


def _shrink_fits(entries: list[dict], sae_steps: int, sae_warmup: int, iters: int, **sae_settings) -> None:
    """Cap every fitted entry's work in place: SAE steps (batches of at most 1024 rows), Lloyd/EM
    iterations, one mini-batch epoch. Pretrained entries are imported, not fitted: left alone."""
    for entry in entries:
        if entry.get("method") == "pretrained":
            continue
        if entry.get("method") == "sae":
            entry.update(steps=min(entry.get("steps", 1000), sae_steps),
                         batch_size=min(entry.get("batch_size", 4096), 1024),
                         warmup_steps=min(entry.get("warmup_steps", 100), sae_warmup), **sae_settings)
        else:
            entry["max_iter"] = min(entry.get("max_iter", 100), iters)
            if entry.get("method") == "minibatch_kmeans":
                entry["epochs"] = 1


def _quick(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same experiment, smaller: for a first look in a few minutes."""
    data = cfg.model_dump()
    data["name"] += "-quick"
    ex = data["extract"]
    ex["train_tokens"], ex["eval_tokens"] = min(ex["train_tokens"], 20_000), min(ex["eval_tokens"], 4_000)
    for entry in data["fit"]:
        if entry["method"] != "pretrained":
            size_key = "latents" if entry["method"] == "sae" else "k"
            entry[size_key] = entry[size_key][:2]
            if entry["method"] != "sae":
                entry["init_sample"] = min(entry["init_sample"], 5000)
    _shrink_fits(data["fit"], sae_steps=40, sae_warmup=4, iters=10, checkpoint_every=0, log_every=10)
    ev = data["evaluate"]
    ev["ce_contexts"], ev["cluster_sample"] = min(ev["ce_contexts"], 2), min(ev["cluster_sample"], 2000)
    it = data["interpret"]
    it["n_top"], it["per_interval"] = min(it["n_top"], 5), min(it["per_interval"], 1)
    st = data["steer"]
    st["contexts"], st["new_tokens"], st["n_units"] = min(st["contexts"], 4), min(st["new_tokens"], 5), min(st["n_units"], 2)
    st["alphas"] = st["alphas"][-1:]
    return ExperimentConfig.model_validate(data)


def _quick_convergence(cfg):
    """The same comparison, smaller: a smoke test of every level in a few minutes."""
    from dictlab.config import ConvergeConfig

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
    for entries in [data["dictionaries"]["fit"], *(m["fit"] for m in data["models"] if m["fit"] is not None)]:
        _shrink_fits(entries, sae_steps=40, sae_warmup=4, iters=10, checkpoint_every=0, log_every=10)
        for entry in entries:
            if entry["method"] not in ("sae", "pretrained"):
                entry["init_sample"] = min(entry["init_sample"], 5000)
    return ConvergeConfig.model_validate(data)


def _converge(args, progress: bool) -> None:
    from dictlab.config import ConvergeConfig
    from dictlab.converge import headlines, run_convergence

    cfg = load_config(args.config, ConvergeConfig)
    cfg = _quick_convergence(cfg) if args.quick else cfg
    out = run_convergence(cfg, args.runs_dir, progress)
    print("\n".join(headlines(out)))
    run = Path(args.runs_dir) / cfg.name
    print(f"results: {run / 'convergence.json'}\nreport:  {run / 'report.html'}")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _interpret(args, progress: bool) -> None:
    from dictlab.config import InterpretConfig
    from dictlab.interpret_run import Interpreter
    from dictlab.store import Store

    try:
        cfg = InterpretConfig(split=args.split, n_top=args.n_top, per_interval=args.per_interval,
                              logit_lens=not args.no_logit_lens, coherence=not args.no_coherence,
                              explainer_url=args.explainer_url, explainer_model=args.explainer_model,
                              explain_units=args.explain_units)
    except ValidationError as e:
        raise DictlabError(_explain(e, InterpretConfig, "command line")) from e
    for folder in args.dictionaries:
        if not (Path(folder) / "config.json").exists():
            raise DictlabError(f"{folder} is not a dictionary folder (it has no config.json)")
    interpreter = Interpreter(Store(args.store), cfg)
    for note in interpreter.notes:
        print(f"note: {note}", file=sys.stderr)
    for folder in map(Path, args.dictionaries):
        summary = interpreter.folder(folder, progress)["summary"]
        print(f"{folder}/interpretation.json, cards.html: {summary['units_firing']}/{summary['units']} units fire "
              f"on the {args.split} split; median token entropy {_fmt(summary['median_token_entropy'], '.3f')} "
              f"nats; single-token {_fmt(summary['single_token_fraction'], '.1%')}; median coherence z "
              f"{_fmt(summary['median_coherence'], '.2f')}, coherent {_fmt(summary['coherent_fraction'], '.1%')}; "
              f"monosemantic {_fmt(summary['monosemantic_fraction'], '.1%')}")


def _graph(args, progress: bool) -> None:
    from dictlab.graph import build_graph, write_graph
    from dictlab.store import Store

    if len(args.dictionaries) > 2:
        raise DictlabError(f"graph takes one dictionary (within its site) or two, got {len(args.dictionaries)}")
    if not 0 <= args.min_r < 1 or args.min_count < 1 or args.bins < 1:
        raise DictlabError(f"--min-r must be in [0, 1), --min-count and --bins at least 1; got {args.min_r}, "
                           f"{args.min_count}, {args.bins}")
    for folder in args.dictionaries:
        if not (Path(folder) / "config.json").exists():
            raise DictlabError(f"{folder} is not a dictionary folder (it has no config.json)")
    store = Store(args.store)
    store_b = Store(args.store_b) if args.store_b else store
    second = args.dictionaries[1] if len(args.dictionaries) == 2 else None
    result = build_graph(store, args.dictionaries[0], store_b, second, args.split, args.min_r, args.min_count,
                         args.bins, progress=progress)
    first = Path(args.dictionaries[0])
    out = Path(args.out) if args.out else first / ("graph" if result["same"] else f"graph-{Path(second).name}")
    summary = write_graph(result, out)
    false = summary["expected_false_edge_fraction"]
    print(f"{out}: {summary['edges']} edges (|r| > {args.min_r}, >= {args.min_count} co-active tokens) among "
          f"{summary['co_active_pairs']} co-active pairs over {summary['tokens']} tokens; the document-shuffled null "
          f"gives {summary['null_edges']} ({'-' if false is None else f'{false:.1%}'} of them expected false); "
          f"{len(summary['communities'])} communities")


def _steer(args, progress: bool) -> None:
    import json

    from dictlab import steer
    from dictlab.io import atomic_path
    from dictlab.store import Store

    folder = Path(args.dictionary)
    for path in (folder, args.downstream):
        if path is not None and not (Path(path) / "config.json").exists():
            raise DictlabError(f"{path} is not a dictionary folder (it has no config.json)")
    if args.contexts < 1 or args.new_tokens < 0 or args.hold < 1 or args.verify < 0:
        raise DictlabError(f"--contexts and --hold must be at least 1, --new-tokens and --verify at least 0; got "
                           f"{args.contexts}, {args.hold}, {args.new_tokens}, {args.verify}")
    if args.cross_graph and not args.downstream:
        raise DictlabError("--cross-graph links units to a downstream dictionary: give --downstream too")
    out = steer.steer_dictionary(folder, Store(args.store), args.units, args.alphas, args.graph, args.downstream,
                                 args.cross_graph, args.hold, args.contexts, args.prompt, args.new_tokens,
                                 args.mean_ablation, args.ablate_set, args.verify, progress)
    with atomic_path(folder / "steering.json") as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    for r in out["steering"]:
        below = f"  downstream drift {r['downstream_drift'][0]:.4f}" if "downstream_drift" in r else ""
        print(f"unit {r['unit']:>5} α {r['alpha']:9.3g} {r['mode']:<10} target {r['target'][0]:+.3f} "
              f"[{r['target'][1]:+.3f}, {r['target'][2]:+.3f}]  drift {r['drift'][0]:.4f}  KL {r['kl'][0]:.4f}"
              f"{below}")
    for r in out["ablation"]:
        estimate = f"  (attribution estimate {r['estimate']:+.4f})" if "estimate" in r else ""
        print(f"ablating unit {r['unit']}: loss {r['loss'][0]:+.4f} [{r['loss'][1]:+.4f}, {r['loss'][2]:+.4f}]"
              f"{estimate}")
    print(f"{folder}/steering.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dictlab", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--runs-dir", default="runs", help="where run directories live (default: runs)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="extract -> fit -> evaluate -> interpret -> report from one config, skipping finished stages")
    p.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--quick", action="store_true",
                   help="a smaller version of the run, in RUNS_DIR/NAME-quick: at most 20k train and 4k eval "
                        "tokens, the first two sizes of each entry, 10 Lloyd/EM iterations, 40 SAE steps of 1024 "
                        "rows, 2 contexts for the CE loss, a 2000-row cluster sample, 5 top and 1 random example "
                        "per fifth of the range per unit")

    p = sub.add_parser("extract", help="corpus -> activation store (resumable: rerun to continue)")
    p.add_argument("config", nargs="?", help="experiment YAML (optional: flags alone work too)")
    p.add_argument("--out", help="store folder (default: RUNS_DIR/NAME/store)")
    _add_extract_flags(p)

    p = sub.add_parser("fit", help="fit dictionaries (k-means family, mixtures, SAEs, transcoders) on the "
                                   "store's train split")
    p.add_argument("config", nargs="?", help="experiment YAML (its run's store is used)")
    p.add_argument("--store", help="store folder (default: RUNS_DIR/NAME/store)")
    p.add_argument("--out", help="dictionaries folder (default: RUNS_DIR/NAME/dictionaries, or "
                                 "dictionaries-quick with --quick-test)")
    p.add_argument("--quick-test", action="store_true",
                   help="smoke test: SAEs train 200 steps of 1024 rows, k-means and EM run 5 iterations; "
                        "written apart (dictionaries-quick) and evaluated")
    p.add_argument("--eval-only", action="store_true",
                   help="fit nothing: evaluate the dictionaries these settings already produced")
    _add_fit_flags(p)

    p = sub.add_parser("evaluate", help="reconstruction, sparsity, cluster quality and costs of saved dictionaries "
                                        "on the eval split")
    p.add_argument("dictionaries", nargs="+", help="dictionary folders (each with config.json)")
    p.add_argument("--store", required=True, help="store folder")
    p.add_argument("--out", help="write results JSON here (default: print only)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--cluster-sample", type=int, default=10_000,
                   help="eval rows for silhouette, Calinski-Harabasz and Davies-Bouldin (default 10000)")
    p.add_argument("--ce-contexts", type=int, default=32,
                   help="eval contexts for the CE loss with each reconstruction spliced into the model "
                        "(default 32; 0 skips it)")

    p = sub.add_parser("interpret", help="what each unit responds to: top and sampled contexts, frequency, "
                                         "histogram, logit lens; writes DICT/interpretation.json and "
                                         "DICT/cards.html")
    p.add_argument("dictionaries", nargs="+", help="dictionary folders (each with config.json)")
    p.add_argument("--store", required=True, help="store folder (its model gives the tokens and the logit lens)")
    p.add_argument("--split", default="eval", choices=["eval", "train"], help="rows to read (default: eval)")
    p.add_argument("--n-top", type=int, default=20, help="top examples per unit (default 20)")
    p.add_argument("--per-interval", type=int, default=5,
                   help="random examples from each fifth of a latent's activation range (default 5)")
    p.add_argument("--no-logit-lens", action="store_true", help="do not load the model")
    p.add_argument("--no-coherence", action="store_true",
                   help="skip the context-coherence score (it embeds contexts with all-MiniLM-L6-v2)")
    p.add_argument("--explainer-url", default=os.environ.get("DICTLAB_EXPLAINER_URL"),
                   help="an OpenAI-compatible endpoint (…/v1) that explains units and scores the explanations "
                        "by detection (default: $DICTLAB_EXPLAINER_URL; key: $DICTLAB_EXPLAINER_KEY); none: skipped")
    p.add_argument("--explainer-model", default=os.environ.get("DICTLAB_EXPLAINER_MODEL", "gpt-4o-mini"),
                   help="model name sent to the endpoint (default: $DICTLAB_EXPLAINER_MODEL or gpt-4o-mini)")
    p.add_argument("--explain-units", type=int, default=50,
                   help="explain the first N units that fire (default 50; two requests each)")

    p = sub.add_parser("graph", help="which units fire together: the co-activation graph of one dictionary's units, "
                                     "or between two dictionaries over the same tokens (other sites or layers)")
    p.add_argument("dictionaries", nargs="+", metavar="DICT", help="DICT_A [DICT_B]: one folder (within its site) or two")
    p.add_argument("--store", required=True, help="store folder of DICT_A (and of DICT_B unless --store-b)")
    p.add_argument("--store-b", help="store of DICT_B, extracted from the same corpus and settings (token-aligned)")
    p.add_argument("--split", default="eval", choices=["eval", "train"], help="rows to count over (default: eval)")
    p.add_argument("--min-r", type=float, default=0.3, help="an edge needs |Pearson r| above this (default 0.3)")
    p.add_argument("--min-count", type=int, default=5, help="and at least this many co-active tokens (default 5)")
    p.add_argument("--bins", type=int, default=4, help="activation bins per unit for the binned MI (default 4)")
    p.add_argument("--out", help="output folder (default: DICT_A/graph, or DICT_A/graph-<name of DICT_B>)")

    p = sub.add_parser("steer", help="steer the model with units of a dictionary (plain, and corrective with a "
                                     "co-activation graph) and ablate units; writes DICT/steering.json")
    p.add_argument("dictionary", help="a dictionary folder (its site is edited)")
    p.add_argument("--store", required=True, help="store folder (its model, and eval contexts to measure on)")
    p.add_argument("--units", type=_ints, required=True, help="comma-separated unit numbers to steer and ablate")
    p.add_argument("--alphas", type=_floats, default=[0.25, 0.5, 1.0],
                   help="α as multiples of each unit's largest code on the eval split (default 0.25,0.5,1)")
    p.add_argument("--graph", help="a within-site graph folder of the dictionary (dictlab graph DICT): corrective "
                                   "steering holds each unit's --hold most correlated neighbours")
    p.add_argument("--hold", type=int, default=5, help="neighbours held by corrective steering, and downstream "
                                                      "units linked per unit (default 5)")
    p.add_argument("--downstream", help="a dictionary at a later site of the same store: the drift of its codes "
                                        "is measured too")
    p.add_argument("--cross-graph", help="the graph DICT -> DOWNSTREAM (dictlab graph DICT DOWNSTREAM): each "
                                         "unit's linked downstream units, whose signed change is measured")
    p.add_argument("--mean-ablation", action="store_true", help="ablate units to their mean code on the eval "
                                                                "split instead of 0")
    p.add_argument("--ablate-set", type=_ints, action="append", help="comma-separated units ablated together "
                                                                    "(repeatable)")
    p.add_argument("--verify", type=int, default=5, help="every unit is ranked by its attribution estimate of the "
                                                         "ablation; the top N are also ablated for real (default 5)")
    p.add_argument("--contexts", type=int, default=8, help="eval contexts to measure on (default 8)")
    p.add_argument("--prompt", default="The", help="prompt for the side-by-side generations, at the largest α "
                                                 "(default 'The')")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens generated per prompt (default 20)")

    p = sub.add_parser("converge", help="do two models learn the same things? behaviour, every layer pair and "
                                        "dictionary units compared, with permutation nulls, intervals and BH q-values",
                       description="Compare every pair of the config's models on the same held-out text and prompts: "
                                   "their outputs to prompt suites and next-token predictions, every layer pair's "
                                   "representations (CKA, SVCCA, mutual k-NN, RSA, cosine), and the units of "
                                   "dictionaries fitted on each, each measure beside its permutation null (documents "
                                   "shuffled), with intervals and Benjamini-Hochberg q-values across every test. "
                                   "Writes RUNS_DIR/NAME/convergence.json and report.html; finished parts are reused.")
    p.add_argument("config", help="convergence YAML, e.g. configs/demo-convergence.yaml")
    p.add_argument("--quick", action="store_true",
                   help="a smaller version of the run, in RUNS_DIR/NAME-quick: 16 documents × 8 positions, 2 prompts a "
                        "suite and 8 new tokens, 10k training rows and 40 SAE steps per model, 20 permutations, 10 "
                        "half-samples, 200 bootstrap resamples")

    p = sub.add_parser("report", help="write RUN_DIR/report.html (self-contained) and results.csv from results.json, "
                                      "or the convergence report from convergence.json")
    p.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")

    p = sub.add_parser("store", help="inspect a store")
    p.add_argument("action", choices=["info", "verify"], help="info: counts and sizes; verify: re-hash shards")
    p.add_argument("path", help="store folder")
    return parser


DISTRIBUTED_COMMANDS = ("run", "extract", "fit")


def _join_ranks(command: str):
    """Under torchrun, join the process group for the commands that split their work over ranks."""
    from dictlab import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command not in DISTRIBUTED_COMMANDS:
        raise DictlabError(f"`dictlab {command}` runs in one process; under torchrun only "
                           f"{', '.join(DISTRIBUTED_COMMANDS)} split their work over ranks")
    return distributed.init_from_env()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    logging.basicConfig(level=logging.WARNING, format="dictlab: %(message)s")
    try:
        from dictlab import distributed, evaluation, pipeline
        from dictlab.config import EvalConfig
        from dictlab.store import Store

        world = _join_ranks(args.command)
        main_rank = distributed.is_main(world)
        if args.command == "run":
            cfg = _quick(load_config(args.config)) if args.quick else load_config(args.config)
            results = pipeline.run_experiment(cfg, args.runs_dir, progress)
            if main_rank:
                print(evaluation.format_table(results))
                run = pipeline.run_dir(cfg, args.runs_dir)
                print(f"results: {run / 'results.json'}, {run / 'results.csv'}\nreport:  {run / 'report.html'}")
        elif args.command == "interpret":
            _interpret(args, progress)
        elif args.command == "graph":
            _graph(args, progress)
        elif args.command == "steer":
            _steer(args, progress)
        elif args.command == "converge":
            _converge(args, progress)
        elif args.command == "report":
            if (Path(args.run_dir) / "convergence.json").exists():
                from dictlab.report_converge import write_convergence_report

                print(write_convergence_report(args.run_dir, args.out))
            else:
                from dictlab.report import write_report

                print(write_report(args.run_dir, args.out))
        elif args.command == "extract":
            cfg = _config(args)
            out = args.out or pipeline.store_location(cfg, pipeline.run_dir(cfg, args.runs_dir))
            from dictlab.extract import extract

            extract(cfg.model, cfg.corpus, cfg.extract, out, progress)
            if main_rank:
                print(pipeline.dumps(Store(out).info()))
        elif args.command == "fit":
            cfg = _config(args)
            run = pipeline.run_dir(cfg, args.runs_dir)
            store = Store(args.store or pipeline.store_location(cfg, run))
            if args.quick_test and args.eval_only:
                raise DictlabError("--quick-test and --eval-only exclude each other")
            default = "dictionaries-quick" if args.quick_test else "dictionaries"
            out = Path(args.out) if args.out else run / default
            folders = pipeline.fit_dictionaries(store, cfg.fit, out, progress, eval_only=args.eval_only,
                                                 seeds=cfg.seeds, world=world)
            if world is not None:
                world.barrier()
            if main_rank and (args.quick_test or args.eval_only):
                print(evaluation.format_table(evaluation.evaluate_dictionaries(store, folders, cfg.evaluate, progress)))
            elif main_rank:
                for folder in folders:
                    print(folder)
        elif args.command == "evaluate":
            store = Store(args.store)
            cfg = EvalConfig(batch_size=args.batch_size, cluster_sample=args.cluster_sample,
                             ce_contexts=args.ce_contexts)
            folders = [Path(d) for d in args.dictionaries]
            if args.out:
                results = pipeline.stage_evaluate(store, folders, cfg, Path(args.out), progress)
            else:
                results = evaluation.evaluate_dictionaries(store, folders, cfg, progress)
            print(evaluation.format_table(results))
        elif args.command == "store":
            store = Store(args.path)
            if args.action == "info":
                print(pipeline.dumps(store.info()))
            else:
                problems = store.verify()
                for line in problems:
                    print(f"problem: {line}")
                if problems:
                    return 1
                print(f"ok: {sum(store.info()['shards'].values())} shards verified")
        return 0
    except DictlabError as e:
        if args.debug or os.environ.get("DICTLAB_DEBUG"):
            raise
        print(f"dictlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dictlab: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

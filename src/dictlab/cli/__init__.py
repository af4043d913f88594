"""The `dictlab` command line: a thin layer over the stage functions in pipeline.py (its arguments are in
parser.py). The top layer: it may import every package, and imports the stages only when a command
runs, so that `dictlab --help` is instant."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from dictlab.cli.parser import build_parser
from dictlab.errors import DictlabError


def _config(args):
    """The config file (or the defaults), with the command-line overrides applied and re-validated."""
    from pydantic import ValidationError

    from dictlab import pipeline
    from dictlab.config import ExperimentConfig, explain, load_config
    from dictlab.dictionaries.learner import learner_class

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
        ("extract", "model_dtype"): getattr(args, "model_dtype", None),
    }
    if getattr(args, "method", None):
        data["fit"] = [{"method": args.method}]
    for key in ("k", "latents", "max_iter", "seed"):  # --k and --latents set the sizes of the entries sized by them
        value = getattr(args, key, None)
        for entry in data["fit"] if value is not None else []:
            learner = learner_class(entry)
            if learner and (learner.size_field == key if key in ("k", "latents") else key in learner.model_fields):
                entry[key] = value
    for path, value in overrides.items():
        if value is not None:
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise DictlabError(explain(e, ExperimentConfig, "command line", data)) from e
    return pipeline.smoke_test(cfg) if getattr(args, "quick_test", False) else cfg


def _converge(args, progress: bool) -> None:
    from dictlab import pipeline
    from dictlab.analyses.convergence.run import headlines
    from dictlab.config import ConvergeConfig, load_config

    cfg = load_config(args.config, ConvergeConfig)
    cfg = pipeline.quick_convergence(cfg) if args.quick else cfg
    run = Path(args.runs_dir) / cfg.name
    with _locked([run]):
        out = pipeline.converge(cfg, args.runs_dir, progress)
    print("\n".join(headlines(out)))
    print(f"results: {run / 'convergence.json'}\nreport:  {run / 'report.html'}")


def _locked(folders, world=None, existing_only: bool = False) -> contextlib.ExitStack:
    """The write locks of these folders (data/lock.py), held by the main rank only; `existing_only`: skip
    a folder that does not exist (a dictionary folder: the command then says it holds no dictionary)."""
    from dictlab.data import distributed
    from dictlab.data.lock import folder_lock

    stack = contextlib.ExitStack()
    if distributed.is_main(world):
        for folder in dict.fromkeys(str(f) for f in folders if f is not None):
            if not existing_only or Path(folder).is_dir():
                stack.enter_context(folder_lock(folder))
    return stack


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _interpret(args, progress: bool) -> None:
    from pydantic import ValidationError

    from dictlab.config import InterpretConfig, explain
    from dictlab.data.store import Store
    from dictlab.interpret.stage import Interpreter
    from dictlab.report.cards import write_dictionary_cards

    try:
        cfg = InterpretConfig(split=args.split, n_top=args.n_top, per_interval=args.per_interval,
                              logit_lens=not args.no_logit_lens, coherence=not args.no_coherence,
                              explainer_url=args.explainer_url, explainer_model=args.explainer_model,
                              explain_units=args.explain_units)
    except ValidationError as e:
        raise DictlabError(explain(e, InterpretConfig, "command line")) from e
    for folder in args.dictionaries:
        if not (Path(folder) / "config.json").exists():
            raise DictlabError(f"{folder} is not a dictionary folder (it has no config.json)")
    interpreter = Interpreter(Store(args.store), cfg)
    for note in interpreter.notes:
        print(f"note: {note}", file=sys.stderr)
    for folder in map(Path, args.dictionaries):
        summary = interpreter.folder(folder, progress)["summary"]
        write_dictionary_cards(folder)
        print(f"{folder}/interpretation.json, cards.html: {summary['units_firing']}/{summary['units']} units fire "
              f"on the {args.split} split; median token entropy {_fmt(summary['median_token_entropy'], '.3f')} "
              f"nats; single-token {_fmt(summary['single_token_fraction'], '.1%')}; median coherence z "
              f"{_fmt(summary['median_coherence'], '.2f')}, coherent {_fmt(summary['coherent_fraction'], '.1%')}; "
              f"monosemantic {_fmt(summary['monosemantic_fraction'], '.1%')}")


def _graph(args, progress: bool) -> None:
    from dictlab.analyses.graph import build_graph, write_graph
    from dictlab.data.store import Store
    from dictlab.report.graphs_and_steering import draw_graph

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
    draw_graph(out)
    false = summary["expected_false_edge_fraction"]
    print(f"{out}: {summary['edges']} edges (|r| > {args.min_r}, >= {args.min_count} co-active tokens) among "
          f"{summary['co_active_pairs']} co-active pairs over {summary['tokens']} tokens; the document-shuffled null "
          f"gives {summary['null_edges']} ({'-' if false is None else f'{false:.1%}'} of them expected false); "
          f"{len(summary['communities'])} communities")


def _steer(args, progress: bool) -> None:
    import json

    from dictlab.analyses import steer
    from dictlab.data.io import atomic_path
    from dictlab.data.store import Store

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


def _formats(args) -> None:
    """`dictlab export` and `dictlab import`."""
    from dictlab.data.io import atomic_folder, sha256_file
    from dictlab.dictionaries.formats import export, hookpoints, load_sae

    if args.command == "export":
        out = export(args.dictionary, args.to, args.out, args.force, args.hook_name, model_id=args.model_id,
                     layer=args.layer, sae_set=args.sae_set, features_per_batch=args.features_per_batch)
        print(f"{args.to}: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
        return
    if args.list:
        held = hookpoints(Path(args.source))
        if not held:
            raise DictlabError(f"{args.source} is not a sparsify checkpoint root (no sub-folder with cfg.json and "
                               "sae.safetensors)")
        print("\n".join(held))
        return
    if args.out is None:
        raise DictlabError("dictlab import needs OUT, the dictlab folder to write (or --list)")
    sae = load_sae(args.source, args.hookpoint, args.norm_scaling_factor)
    extra = {"source": args.source, "source_sha256": sha256_file(sae.source_file),
             **({"hookpoint": args.hookpoint} if args.hookpoint else {}),
             **({"site": args.site} if args.site else {})}
    with atomic_folder(Path(args.out), args.force) as tmp:
        sae.save(tmp, extra=extra)
    hp = sae.hparams
    print(f"imported {sae.label} ({hp['rule']}, {sae.n_latents} latents, {sae.d_in} -> {sae.d_model}) into {args.out}")


DISTRIBUTED_COMMANDS = ("run", "extract", "fit")


def _join_ranks(command: str):
    """Under torchrun, join the process group for the commands that split their work over ranks."""
    from dictlab.data import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command not in DISTRIBUTED_COMMANDS:
        raise DictlabError(f"`dictlab {command}` runs in one process; under torchrun only "
                           f"{', '.join(DISTRIBUTED_COMMANDS)} split their work over ranks")
    return distributed.init_from_env()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    verify_setting = os.environ.get("DICTLAB_NO_VERIFY")
    if args.no_verify:
        os.environ["DICTLAB_NO_VERIFY"] = "1"  # read by every Store this command (and its children) opens
    logging.basicConfig(level=logging.WARNING, format="dictlab: %(message)s")
    try:
        from dictlab import pipeline
        from dictlab.config import EvalConfig, load_config
        from dictlab.data import distributed
        from dictlab.data.store import Store
        from dictlab.measures import evaluation

        world = _join_ranks(args.command)
        main_rank = distributed.is_main(world)
        if args.command == "run":
            from dictlab.planning import check_disk

            cfg = pipeline.quick(load_config(args.config)) if args.quick else load_config(args.config)
            disk = check_disk(cfg, pipeline.run_dir(cfg, args.runs_dir), args.force)
            if main_rank:
                print(f"dictlab: {disk}", file=sys.stderr)
            results = pipeline.run_experiment(cfg, args.runs_dir, progress)  # takes the run's locks
            if main_rank:
                print(evaluation.format_table(results))
                run = pipeline.run_dir(cfg, args.runs_dir)
                print(f"results: {run / 'results.json'}, {run / 'results.csv'}\nreport:  {run / 'report.html'}")
        elif args.command == "plan":
            from dictlab.planning import format_plan, plan_run

            cfg = pipeline.quick(load_config(args.config)) if args.quick else load_config(args.config)
            print(format_plan(plan_run(cfg, progress)))
        elif args.command == "interpret":
            with _locked(args.dictionaries, existing_only=True):
                _interpret(args, progress)
        elif args.command == "graph":
            with _locked(args.dictionaries[:1], existing_only=True):
                _graph(args, progress)
        elif args.command == "steer":
            with _locked([args.dictionary], existing_only=True):
                _steer(args, progress)
        elif args.command == "converge":
            _converge(args, progress)
        elif args.command == "report":
            if (Path(args.run_dir) / "convergence.json").exists():
                from dictlab.report.convergence import write_convergence_report

                print(write_convergence_report(args.run_dir, args.out))
            else:
                from dictlab.report.run_report import write_report

                print(write_report(args.run_dir, args.out))
        elif args.command == "extract":
            cfg = _config(args)
            out = args.out or pipeline.store_location(cfg, pipeline.run_dir(cfg, args.runs_dir))
            from dictlab.data.extract import extract

            with _locked([out], world):
                extract(cfg.model_spec, cfg.corpus, cfg.extract, out, progress)
            if main_rank:
                print(pipeline.dumps(Store(out).info()))
        elif args.command == "fit":
            from dictlab.dictionaries.fitting import fit_dictionaries

            cfg = _config(args)
            run = pipeline.run_dir(cfg, args.runs_dir)
            store = Store(args.store or pipeline.store_location(cfg, run))
            if args.quick_test and args.eval_only:
                raise DictlabError("--quick-test and --eval-only exclude each other")
            default = "dictionaries-quick" if args.quick_test else "dictionaries"
            out = Path(args.out) if args.out else run / default
            with _locked([run], world):
                folders = fit_dictionaries(store, cfg.fit, out, progress, eval_only=args.eval_only,
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
                             ce_contexts=args.ce_contexts, bootstrap=args.bootstrap)
            folders = [Path(d) for d in args.dictionaries]
            if args.out:
                results = pipeline.stage_evaluate(store, folders, cfg, Path(args.out), progress)
            else:
                results = evaluation.evaluate_dictionaries(store, folders, cfg, progress)
            print(evaluation.format_table(results))
        elif args.command in ("export", "import"):
            _formats(args)
        elif args.command == "store" and args.action == "repair":
            from dictlab.data.repair import repair

            with _locked([args.path], existing_only=True):
                repaired = repair(args.path, progress)
            print(f"repaired {len(repaired)} shard(s): {', '.join(repaired)}" if repaired else
                  f"ok: every shard of {args.path} matches its manifest; nothing to repair")
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
    finally:
        if verify_setting is None:
            os.environ.pop("DICTLAB_NO_VERIFY", None)
        else:
            os.environ["DICTLAB_NO_VERIFY"] = verify_setting

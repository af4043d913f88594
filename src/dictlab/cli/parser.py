"""The `dictlab` command line's arguments: every command, its flags and their help."""

from __future__ import annotations

import argparse
import os

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
  dictlab store info|verify|repair STORE counts, dtype, sizes; re-check every shard's sha256; re-extract bad ones
  dictlab export DICT --to FORMAT OUT    a saved dictionary as saelens, sparsify or neuronpedia files
  dictlab import SRC OUT                 a SAELens / sparsify / Gemma Scope SAE into a dictlab folder
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
    p.add_argument("--model-dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the model's compute dtype (default auto: bfloat16 with CUDA, else the faster of float32 and "
                        "bfloat16 by a short probe)")


def _add_fit_flags(p):
    p.add_argument("--method", metavar="METHOD",
                   help="fit only this method (a fit entry's `method:`, with its defaults) instead of the config's "
                        "fit list; an unknown one is refused with the list of methods")
    p.add_argument("--k", type=_ints, help="comma-separated K (clusters or components), for every entry sized by K")
    p.add_argument("--latents", type=_ints, help="comma-separated SAE widths, for every SAE entry")
    p.add_argument("--max-iter", type=int, help="Lloyd / EM iterations at most")
    p.add_argument("--seed", type=int, help="seed of the init")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dictlab", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--runs-dir", default="runs", help="where run directories live (default: runs)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check each store shard against its recorded sha256 as it is read (the check is "
                             "on by default: a damaged shard stops the stage, naming it; see docs/integrity.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run",
                       help="extract -> fit -> evaluate -> interpret -> report from one config, skipping finished "
                            "stages")
    p.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--quick", action="store_true",
                   help="a smaller version of the run, in RUNS_DIR/NAME-quick: at most 20k train and 4k eval "
                        "tokens, the first two sizes of each entry, 10 Lloyd/EM iterations, 40 SAE steps of 1024 "
                        "rows, 2 contexts for the CE loss, a 2000-row cluster sample, 5 top and 1 random example "
                        "per fifth of the range per unit")

    p.add_argument("--force", action="store_true",
                   help="start even when the store's disk looks too small for it (checked before anything runs)")

    p = sub.add_parser("plan", help="predict a run's time, disk, peak RAM and device memory per stage, from short "
                                    "measured probes (every stage in miniature, in a temporary folder)")
    p.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("--quick", action="store_true", help="plan the --quick version of the run")

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
                   help="eval contexts for the CE loss with each reconstruction spliced into the model, one per "
                        "document in turn (default 32; 0 skips it)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap draws over held-out documents for the 95%% intervals of FVU, CE recovered and "
                        "KL, the same draws for every dictionary (default 1000; 0: no intervals)")

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
    p.add_argument("dictionaries", nargs="+", metavar="DICT",
                   help="DICT_A [DICT_B]: one folder (within its site) or two")
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

    p = sub.add_parser("export", help="write a saved dictionary in another tool's format (all or nothing: on an "
                                      "error OUT is left as it was)")
    p.add_argument("dictionary", help="a dictionary folder (config.json + weights.safetensors)")
    p.add_argument("--to", required=True, choices=("saelens", "sparsify", "neuronpedia"),
                   help="saelens: cfg.json + sae_weights.safetensors (+ sparsity.safetensors after `dictlab "
                        "interpret`); sparsify: cfg.json + sae.safetensors (top-k and group-max coders); "
                        "neuronpedia: batch-N.json feature dashboards from DICT/interpretation.json (any dictionary)")
    p.add_argument("out", help="the folder to write (must not hold files, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT when it holds files")
    p.add_argument("--hook-name", default="",
                   help="saelens: the hook name in cfg.json (default: the site as TransformerLens names it, "
                        "e.g. blocks.8.hook_resid_post)")
    p.add_argument("--model-id", help="neuronpedia: the model id (default: the store's model)")
    p.add_argument("--layer", type=int, help="neuronpedia: the layer (default: the site's)")
    p.add_argument("--sae-set", help="neuronpedia: the SAE set name (default: the dictionary folder's name)")
    p.add_argument("--features-per-batch", type=int, default=128, help="neuronpedia: features per batch file")

    p = sub.add_parser("import", help="read an SAE or transcoder saved by another tool into a dictlab folder, "
                                      "which `pretrained` fit entries and every command take")
    p.add_argument("source", help="a SAELens or sparsify folder, a sparsify checkpoint root (with --hookpoint), a "
                                  "Gemma Scope params.npz, or hub:OWNER/REPO/PATH; the format is told from the files")
    p.add_argument("out", nargs="?", help="the dictlab folder to write (must not hold files, unless --force)")
    p.add_argument("--hookpoint", help="sparsify checkpoint root: the hookpoint folder to read, e.g. layers.10")
    p.add_argument("--list", action="store_true", help="sparsify checkpoint root: list its hookpoints and stop")
    p.add_argument("--norm-scaling-factor", type=float,
                   help="SAELens normalize_activations=expected_average_only_in: the input's scaling factor, when "
                        "cfg.json does not give it")
    p.add_argument("--site", help="the site it reads, recorded in the folder (e.g. L12.resid_post)")
    p.add_argument("--force", action="store_true", help="replace OUT when it holds files")

    p = sub.add_parser("store", help="inspect a store")
    p.add_argument("action", choices=["info", "verify", "repair"],
                   help="info: counts and sizes; verify: re-hash every shard against the manifest; repair: "
                        "re-extract exactly the shards that fail verification (same model, documents and positions: "
                        "the repaired store equals an undamaged one byte for byte)")
    p.add_argument("path", help="store folder")
    return parser

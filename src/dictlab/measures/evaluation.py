"""The evaluation stage: every metric of every saved dictionary on a store's eval split.

Reconstruction and sparsity (metrics.py), cluster quality on a seeded sample shared by the
dictionaries of a site, each dictionary's own held-out metrics (mixtures), its costs, and the
model's next-token loss with the reconstruction spliced in (downstream.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from dictlab.data import distributed
from dictlab.data.io import read_json
from dictlab.data.placement import Auto, to_device
from dictlab.data.store import Store
from dictlab.dictionaries import load_dictionary
from dictlab.errors import DictlabError
from dictlab.measures.downstream import (
    Spliced,
    context_documents,
    eval_context_batches,
    next_token_losses,
    recovered,
    variants,
)
from dictlab.measures.metrics import ClusterSample, cluster_quality, evaluate_with_documents
from dictlab.measures.resampling import draw_counts, fvu_draws, interval, ratio_draws
from dictlab.measures.stability import mean_over_pairs, stability
from dictlab.options import Strict


class EvalConfig(Strict):
    batch_size: int = Field(4096, ge=1)
    cluster_sample: int = Field(10_000, ge=2, description="eval rows for silhouette, Calinski-Harabasz, "
                                "Davies-Bouldin (their pairwise distances are held in memory: n² floats)")
    seed: int = Field(0, description="seed of the cluster-quality sample")
    ce_contexts: int = Field(32, ge=0, description="eval contexts for the CE loss with reconstructions spliced "
                             "in (0: skip)")
    ce_batch_size: Auto = Field("auto", description="contexts per forward pass of the CE evaluation (auto: 4 on a "
                                "CPU; on a GPU as many as fit in half its free memory)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap draws over held-out documents for the 95% intervals "
                           "of FVU, CE recovered and KL, the same draws for every dictionary (0: no intervals)")
    stability: bool = Field(False, description="cross-seed stability: match the units of the fits of each entry "
                            "that differ only in their seed (needs seeds: two or more)")


def evaluate_dictionaries(store: Store, folders: list[Path], cfg: EvalConfig, progress: bool = False) -> list[dict]:
    """One row per dictionary and decoding: reconstruction and sparsity (metrics.py), cluster quality
    on a seeded sample of the eval split (shared by the dictionaries of a site), the dictionary's own
    held-out metrics (mixtures: log-likelihood per token, BIC), its costs, and with `ce_contexts`
    the next-token loss with its reconstruction spliced into the model (downstream.py). Dictionaries and
    batches are on the device where this process computes (`distributed.device()`)."""
    rows, samples, spliced, per_document = [], {}, {}, []
    device = distributed.device()
    documents = _documents(store, cfg.batch_size)
    for folder in tqdm(folders, desc="evaluate", disable=not progress, dynamic_ncols=True, leave=False):
        meta = read_json(Path(folder) / "config.json")
        site = meta.get("site")
        if site is None:
            raise DictlabError(f"{folder}: the dictionary does not say which site it was fitted on")
        dictionary = load_dictionary(folder).on_device(device)
        target = meta.get("target_site")
        for s, width in ((site, dictionary.d_in), (target or site, dictionary.d_model)):
            if width != store.d_model(s):
                raise DictlabError(f"{folder}: the dictionary expects width {width} at site {s}, "
                                   f"the store has {store.d_model(s)}")

        def inputs(site=site):
            return to_device(store.batches(site, "eval", cfg.batch_size), device)

        def eval_batches(site=site, target=target):
            """(x, y, each row's document position): y = x unless a transcoder."""
            columns = ("doc",) if target is None else ("doc", target)
            return to_device(((b["x"], b[target or "x"], torch.searchsorted(documents, b["doc"]))
                              for b in store.batches(site, "eval", cfg.batch_size, columns=columns)), device)

        if site not in samples:
            samples[site] = ClusterSample.from_batches(store.batches(site, "eval", cfg.batch_size), store.rows("eval"),
                                                       cfg.cluster_sample, cfg.seed)
        clusters = cluster_quality(dictionary, samples[site], inputs)
        costs = {"fit_seconds": meta.get("fit_seconds"), "fit_peak_rss_mb": meta.get("fit_peak_rss_mb"),
                 "n_parameters": sum(t.numel() for t in dictionary.tensors().values()), "device": device.type,
                 "bytes_on_disk": (Path(folder) / "weights.safetensors").stat().st_size,
                 "weights_sha256": meta.get("weights_sha256")}  # the exact weights behind these numbers
        convergence = meta.get("convergence") or {}  # how the fit ended: converged, or its budget ran out
        costs.update({key: convergence.get(key) for key in ("converged", "tokens_seen", "epochs",
                                                             "final_relative_change")})
        per_row = dictionary.fit_flops_per_row
        costs["encode_flops"] = dictionary.encode_flops  # counted from the shapes, per token
        costs["target_l0"] = dictionary.target_l0  # beside the L0 measured (a BatchTopK's threshold vs its k)
        costs["fit_flops"] = per_row * costs["tokens_seen"] if per_row and costs["tokens_seen"] else None
        extra = dictionary.held_out_metrics(inputs)
        seed = meta.get("inputs", {}).get("fit", {}).get("seed")
        for decoding in dictionary.decodings or (None,):
            view = dictionary.with_decoding(decoding) if decoding else dictionary
            metrics, rows_per_s, sums = evaluate_with_documents(view, eval_batches(), len(documents))
            per_document.append(sums)
            rows.append({
                "dictionary": str(folder), "method": dictionary.label, "decoding": decoding, "site": site,
                "target_site": target, "n_latents": dictionary.n_latents, "unit_kind": dictionary.unit_kind,
                "family": dictionary.family, "seed": seed,
                "group": f"{site}/{re.sub(r'-s[0-9]+$', '', Path(folder).name)}/{decoding or '-'}",
                **metrics.as_dict(), **clusters, **extra, **costs, "encode_tokens_per_s": rows_per_s,
            })
            spliced[f"{folder}#{decoding}"] = Spliced(view, site, target or site)
    if cfg.stability:
        _add_stability(rows, cfg.seed)
    counts = draw_counts(len(documents), cfg.bootstrap, cfg.seed)
    for row, sums in zip(rows, per_document):
        _add_interval(row, "fvu", None if counts is None else fvu_draws(counts, **sums), len(documents))
    if cfg.ce_contexts and rows:
        _add_downstream(store, rows, spliced, cfg, progress)
    return rows


def _add_stability(rows: list[dict], seed: int) -> None:
    """Each row's cross-seed stability (stability.py): its dictionary against the other seeds' fits of
    the same entry, averaged over the pairs; rows of an entry fitted once get none."""
    fits: dict[tuple, list[str]] = {}
    for r in rows:
        entry = (r["site"], r["group"].split("/")[1])
        if r["dictionary"] not in fits.setdefault(entry, []):
            fits[entry].append(r["dictionary"])
    for folders in fits.values():
        if len(folders) < 2:
            continue
        loaded = [load_dictionary(f) for f in folders]
        pairs = [stability(a, b, seed) for i, a in enumerate(loaded) for b in loaded[i + 1:]]
        for r in rows:
            if r["dictionary"] in folders:
                r.update({f"stability_{k}": v for k, v in mean_over_pairs(pairs).items()})


def _documents(store: Store, batch_size: int) -> torch.Tensor:
    """The eval split's document ids, sorted: a row's position among them is its resampling unit."""
    site = next(iter(store.sites))
    return torch.cat([b["doc"] for b in store.batches(site, "eval", batch_size, columns=("doc",))]).unique()


def _add_interval(row: dict, key: str, draws: np.ndarray | None, n_documents: int) -> None:
    """The row's 95% interval of `key` (None with fewer than 2 documents), the number of documents it was
    resampled over, and its draws (6 significant digits) for paired differences between rows."""
    bounds = None if draws is None else interval(draws)
    row[f"{key}_low"], row[f"{key}_high"] = bounds or (None, None)
    row[f"{key}_documents"] = n_documents
    if draws is not None:
        row.setdefault("draws", {})[key] = [float(f"{v:.6g}") for v in draws]


def _add_downstream(store: Store, rows: list[dict], spliced: dict[str, Spliced], cfg: EvalConfig,
                    progress: bool) -> None:
    """CE loss recovered and KL for every row (downstream.py) on `ce_contexts` eval contexts, one per
    document in turn, with their intervals over those documents."""
    model, _, batches = eval_context_batches(store, cfg.ce_contexts, cfg.ce_batch_size)
    docs = np.unique(context_documents(store, "eval", cfg.ce_contexts), return_inverse=True)[1]
    means = {}
    for target in {s.target for s in spliced.values()}:
        total = sum(b.double().sum(0) for b in store.batches(target, "eval", cfg.batch_size))
        means[target] = (total / store.rows("eval")).float().to(batches[0][0].device)
    edits = variants(spliced, means)
    losses = next_token_losses(model, batches, edits, {e for e in edits if e.startswith("error_added:")}, progress)
    tokens = sum(int(m[:, 1:].sum()) for _, m in batches)
    n_docs = int(docs.max()) + 1
    counts = draw_counts(n_docs, cfg.bootstrap, cfg.seed)

    def per_doc(name: str, key: str) -> np.ndarray:
        return np.bincount(docs, losses[name][f"{key}_per_context"], minlength=n_docs)

    for row, (key, s) in zip(rows, spliced.items()):
        row.update(recovered(losses, key, s.target), ce_tokens=tokens)
        spliced_ce = per_doc(f"spliced:{key}", "ce")
        for base in ("zero", "mean"):
            ablated = per_doc(f"{base}:{s.target}", "ce")
            draws = None if counts is None else ratio_draws(counts, ablated - spliced_ce,
                                                            ablated - per_doc("clean", "ce"))
            _add_interval(row, f"ce_recovered_vs_{base}", draws, n_docs)
        kl = None if counts is None else ratio_draws(counts, per_doc(f"spliced:{key}", "kl"),
                                                    per_doc(f"spliced:{key}", "tokens"))
        _add_interval(row, "kl_spliced", kl, n_docs)


def format_table(results: list[dict]) -> str:
    """The printed table: FVU and CE recovered (vs zero ablation) with their 95% intervals over held-out
    documents, where there are some."""
    width = max([len("dictionary")] + [len(Path(r["dictionary"]).name) for r in results])
    header = (f"{'site':<14} {'dictionary':<{width}} {'decoding':<10} {'units':>5} {'L0':>6} {'MSE':>10} "
              f"{'FVU [95%]':>24} {'cos':>7} {'CE rec. [95%]':>21} {'dead':>6} {'silh.':>7} {'loglik/tok':>11} "
              f"{'fit s':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        fit = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") is not None else "-"
        ll = f"{r['loglik_per_token']:.5g}" if "loglik_per_token" in r else "-"
        silhouette = f"{r['silhouette']:.3f}" if r.get("silhouette") is not None else "-"
        lines.append(
            f"{r['site']:<14} {Path(r['dictionary']).name:<{width}} {r.get('decoding') or '-':<10} {r['n_latents']:>5} "
            f"{r['l0']:>6.2f} {r['mse']:>10.4g} {_with_interval(r, 'fvu', '.4f'):>24} {r['cosine']:>7.4f} "
            f"{_with_interval(r, 'ce_recovered_vs_zero', '.3f'):>21} {r['dead_fraction']:>6.1%} "
            f"{silhouette:>7} {ll:>11} {fit:>7}"
        )
    return "\n".join(lines)


def _with_interval(row: dict, key: str, spec: str) -> str:
    if row.get(key) is None:
        return "-"
    text = format(row[key], spec)
    if row.get(f"{key}_low") is not None:
        text += f" [{row[f'{key}_low']:{spec}}, {row[f'{key}_high']:{spec}}]"
    return text

"""The evaluation stage: every metric of every saved dictionary on a store's eval split.

Reconstruction and sparsity (metrics.py), cluster quality on a seeded sample shared by the
dictionaries of a site, each dictionary's own held-out metrics (mixtures), its costs, and the
model's next-token loss with the reconstruction spliced in (downstream.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field
from tqdm.auto import tqdm

from dictlab.data import distributed
from dictlab.data.io import read_json
from dictlab.data.placement import Auto, to_device
from dictlab.data.store import Store
from dictlab.dictionaries import load_dictionary
from dictlab.errors import DictlabError
from dictlab.measures.downstream import Spliced, eval_context_batches, next_token_losses, recovered, variants
from dictlab.measures.metrics import ClusterSample, cluster_quality, evaluate_reconstruction
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


def evaluate_dictionaries(store: Store, folders: list[Path], cfg: EvalConfig, progress: bool = False) -> list[dict]:
    """One row per dictionary and decoding: reconstruction and sparsity (metrics.py), cluster quality
    on a seeded sample of the eval split (shared by the dictionaries of a site), the dictionary's own
    held-out metrics (mixtures: log-likelihood per token, BIC), its costs, and with `ce_contexts`
    the next-token loss with its reconstruction spliced into the model (downstream.py). Dictionaries and
    batches are on the device where this process computes (`distributed.device()`)."""
    rows, samples, spliced = [], {}, {}
    device = distributed.device()
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
            if target is None:
                return inputs(site)
            pairs = ((b["x"], b[target]) for b in store.batches(site, "eval", cfg.batch_size, columns=(target,)))
            return to_device(pairs, device)

        if site not in samples:
            samples[site] = ClusterSample.from_batches(store.batches(site, "eval", cfg.batch_size), store.rows("eval"),
                                                       cfg.cluster_sample, cfg.seed)
        clusters = cluster_quality(dictionary, samples[site], inputs)
        costs = {"fit_seconds": meta.get("fit_seconds"), "fit_peak_rss_mb": meta.get("fit_peak_rss_mb"),
                 "n_parameters": sum(t.numel() for t in dictionary.tensors().values()), "device": device.type,
                 "bytes_on_disk": (Path(folder) / "weights.safetensors").stat().st_size}
        convergence = meta.get("convergence") or {}  # how the fit ended: converged, or its budget ran out
        costs.update({key: convergence.get(key) for key in ("converged", "tokens_seen", "epochs",
                                                             "final_relative_change")})
        extra = dictionary.held_out_metrics(inputs)
        seed = meta.get("inputs", {}).get("fit", {}).get("seed")
        for decoding in dictionary.decodings or (None,):
            view = dictionary.with_decoding(decoding) if decoding else dictionary
            metrics, rows_per_s = evaluate_reconstruction(view, eval_batches())
            rows.append({
                "dictionary": str(folder), "method": dictionary.label, "decoding": decoding, "site": site,
                "target_site": target, "n_latents": dictionary.n_latents, "unit_kind": dictionary.unit_kind,
                "seed": seed,
                "group": f"{site}/{re.sub(r'-s[0-9]+$', '', Path(folder).name)}/{decoding or '-'}",
                **metrics.as_dict(), **clusters, **extra, **costs, "encode_tokens_per_s": rows_per_s,
            })
            spliced[f"{folder}#{decoding}"] = Spliced(view, site, target or site)
    if cfg.ce_contexts and rows:
        _add_downstream(store, rows, spliced, cfg, progress)
    return rows


def _add_downstream(store: Store, rows: list[dict], spliced: dict[str, Spliced], cfg: EvalConfig,
                    progress: bool) -> None:
    """CE loss recovered and KL for every row (downstream.py), on the first eval contexts."""
    model, _, batches = eval_context_batches(store, cfg.ce_contexts, cfg.ce_batch_size)
    means = {}
    for target in {s.target for s in spliced.values()}:
        total = sum(b.double().sum(0) for b in store.batches(target, "eval", cfg.batch_size))
        means[target] = (total / store.rows("eval")).float().to(batches[0][0].device)
    edits = variants(spliced, means)
    losses = next_token_losses(model, batches, edits, {e for e in edits if e.startswith("error_added:")}, progress)
    tokens = sum(int(m[:, 1:].sum()) for _, m in batches)
    for row, (key, s) in zip(rows, spliced.items()):
        row.update(recovered(losses, key, s.target), ce_tokens=tokens)



def format_table(results: list[dict]) -> str:
    width = max([len("dictionary")] + [len(Path(r["dictionary"]).name) for r in results])
    header = (f"{'site':<14} {'dictionary':<{width}} {'decoding':<10} {'units':>5} {'L0':>6} {'MSE':>10} {'FVU':>7} "
              f"{'cos':>7} {'CE rec.':>7} {'dead':>6} {'silh.':>7} {'loglik/tok':>11} {'fit s':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        fit = f"{r['fit_seconds']:.1f}" if r.get("fit_seconds") is not None else "-"
        ll = f"{r['loglik_per_token']:.5g}" if "loglik_per_token" in r else "-"
        silhouette = f"{r['silhouette']:.3f}" if r.get("silhouette") is not None else "-"
        ce = f"{r['ce_recovered_vs_zero']:.3f}" if r.get("ce_recovered_vs_zero") is not None else "-"
        lines.append(
            f"{r['site']:<14} {Path(r['dictionary']).name:<{width}} {r.get('decoding') or '-':<10} {r['n_latents']:>5} "
            f"{r['l0']:>6.2f} "
            f"{r['mse']:>10.4g} {r['fvu']:>7.4f} {r['cosine']:>7.4f} {ce:>7} {r['dead_fraction']:>6.1%} "
            f"{silhouette:>7} {ll:>11} {fit:>7}"
        )
    return "\n".join(lines)

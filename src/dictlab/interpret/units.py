"""What each unit (cluster or latent) of a dictionary responds to, streamed over a store split.

Per unit: its firing frequency, maximum and an activation histogram (10 bins of (0, max]); its top
`n_top` rows by score; and
  latents:  `per_interval` random rows from each of `intervals` equal intervals of (0, max]
            (the dashboard's "activation quantiles"), so weak activations are seen too;
  clusters: the top rows are the most typical members (smallest distance to the centre, or highest
            density for a mixture component), plus `n_random` members drawn uniformly.
Each example row comes with a window of the tokens around it in its context and the unit's
activation on each of them. Scores come from `Dictionary.unit_scores` (an SAE's codes by default).

Memory: O(units × kept examples) plus one batch; three passes over the split (scores, interval
samples, then the window rows).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from dictlab.data.precision import bfloat16_is_faster
from dictlab.data.store import Store, select_rows
from dictlab.dictionaries.base import Dictionary

HISTOGRAM_BINS = 10


def merge_top(best_v: torch.Tensor, best_r: torch.Tensor, units: torch.Tensor, values: torch.Tensor,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, the n largest values seen so far and their rows ([U, n] each; −inf / −1 where empty).

    Ties keep the earlier row, so the result does not depend on how the stream was batched.
    """
    n_units, n = best_v.shape
    u = torch.cat([torch.arange(n_units).repeat_interleave(n), units])
    v = torch.cat([best_v.flatten(), values.float()])
    r = torch.cat([best_r.flatten(), rows])
    order = torch.argsort(r, stable=True)  # row order breaks ties
    order = order[torch.argsort(v[order], descending=True, stable=True)]
    order = order[torch.argsort(u[order], stable=True)]
    u, v, r = u[order], v[order], r[order]
    start = torch.zeros(n_units + 1, dtype=torch.long)
    start[1:] = torch.bincount(u, minlength=n_units).cumsum(0)
    rank = torch.arange(len(u)) - start[u]
    keep = (rank < n) & (r >= 0)
    new_v, new_r = torch.full((n_units, n), -math.inf), torch.full((n_units, n), -1, dtype=torch.long)
    new_v[u[keep], rank[keep]] = v[keep]
    new_r[u[keep], rank[keep]] = r[keep]
    return new_v, new_r


def _scores(dictionary: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`unit_scores` of a batch, computed where the dictionary is (x is moved there), kept on the CPU."""
    return tuple(t.cpu() for t in dictionary.unit_scores(x.to(dictionary.device, non_blocking=True)))


def _active(values: torch.Tensor, indices: torch.Tensor, active: torch.Tensor, offset: int):
    """(unit, score, row) triples of the active slots of a batch of `unit_scores`."""
    rows = torch.arange(values.shape[0]).unsqueeze(1).expand_as(values)
    return indices[active], values[active], rows[active] + offset


def unit_examples(dictionary: Dictionary, batches: Callable[[], Iterator[torch.Tensor]], n_top: int = 20,
                  intervals: int = 5, per_interval: int = 5, n_random: int = 10, seed: int = 0,
                  progress: bool = False) -> dict:
    """Per-unit statistics and example rows (global row indices of the stream); see the module doc."""
    n_units, clusters = dictionary.n_latents, dictionary.unit_kind == "cluster"
    top_v, top_r = torch.full((n_units, n_top), -math.inf), torch.full((n_units, n_top), -1, dtype=torch.long)
    fires, n_rows = torch.zeros(n_units, dtype=torch.long), 0
    peak = torch.full((n_units,), -math.inf)
    for x in tqdm(batches(), desc="interpret: top rows", disable=not progress, leave=False):
        u, v, r = _active(*_scores(dictionary, x), n_rows)
        top_v, top_r = merge_top(top_v, top_r, u, v, r)
        fires += torch.bincount(u, minlength=n_units)
        peak = peak.scatter_reduce(0, u, v.float(), "amax")
        n_rows += x.shape[0]
    # second pass: uniform samples, per activation interval (latents) or per cluster, by random keys
    slots = 1 if clusters else intervals
    keep = n_random if clusters else per_interval
    g = torch.Generator().manual_seed(seed)
    sample_v = torch.full((n_units * slots, keep), -math.inf)
    sample_r = torch.full((n_units * slots, keep), -1, dtype=torch.long)
    hist = torch.zeros(n_units * HISTOGRAM_BINS, dtype=torch.long)
    offset = 0
    for x in tqdm(batches(), desc="interpret: samples", disable=not progress, leave=False):
        u, v, r = _active(*_scores(dictionary, x), offset)
        offset += x.shape[0]
        key = torch.rand(len(u), generator=g)
        if clusters:
            slot = u
        else:
            frac = (v.float() / peak[u].clamp_min(1e-30)).clamp(0, 1)
            slot = u * slots + (frac * slots).ceil().long().clamp(1, slots) - 1
            hbin = (frac * HISTOGRAM_BINS).ceil().long().clamp(1, HISTOGRAM_BINS) - 1
            hist += torch.bincount(u * HISTOGRAM_BINS + hbin, minlength=n_units * HISTOGRAM_BINS)
        sample_v, sample_r = merge_top(sample_v, sample_r, slot, -key, r)
    return {"n_rows": n_rows, "frequency": (fires.double() / max(n_rows, 1)), "max": peak,
            "top_scores": top_v, "top_rows": top_r, "samples": sample_r.view(n_units, slots, keep),
            "histogram": hist.view(n_units, HISTOGRAM_BINS), "kind": "cluster" if clusters else "latent"}


def windows(store: Store, site: str, split: str, rows: torch.Tensor, before: int, after: int,
            dictionary: Dictionary, units: torch.Tensor, batch_size: int = 4096, with_active: int = 0) -> list[dict]:
    """For each example row (with the unit it illustrates): the tokens of its context from `before`
    rows earlier to `after` rows later and the unit's score on each of them; for the last
    `with_active` rows also the units active at the row itself."""
    columns = ("token", "context", "pos")
    parts = [{c: b[c] for c in columns} for b in store.batches(site, split, 1 << 16, columns=columns)]  # drop x
    meta = {c: torch.cat([b[c] for b in parts]) for c in columns}
    n = len(meta["token"])
    at = rows.unsqueeze(1) + torch.arange(-before, after + 1)  # [R, S] the window's global rows
    clamped = at.clamp(0, n - 1)
    same = (at >= 0) & (at < n) & (meta["context"][clamped] == meta["context"][rows].unsqueeze(1))
    needed = torch.unique(clamped[same])
    values, indices, active = _scores_of_rows(store, site, split, needed, dictionary, batch_size)
    where = torch.searchsorted(needed, clamped).clamp(max=max(len(needed) - 1, 0))  # [R, S] into needed
    # the score of unit u at needed row m, looked up by the key m·U + u among the sorted active keys
    n_units = dictionary.n_latents
    row, slot = active.nonzero(as_tuple=True)
    keys, order = (row * n_units + indices[row, slot]).sort()
    found = values[row, slot][order]
    query = where * n_units + units.unsqueeze(1)
    hit = torch.searchsorted(keys, query).clamp(max=max(len(keys) - 1, 0))
    scores = torch.where(keys[hit] == query, found[hit], 0) if len(keys) else torch.zeros(at.shape)
    first = same.int().argmax(1)  # a window is contiguous: its first and last rows in the context
    last = at.shape[1] - same.flip(1).int().argmax(1)
    tokens, scores = meta["token"][clamped].tolist(), scores.tolist()
    contexts, positions = meta["context"][rows].tolist(), meta["pos"][rows].tolist()
    out = []
    for i, (row, lo, hi) in enumerate(zip(rows.tolist(), first.tolist(), last.tolist())):
        out.append({"row": row, "context": contexts[i], "pos": positions[i], "tokens": tokens[i][lo:hi],
                    "target": before - lo, "scores": scores[i][lo:hi]})
    for i in range(len(rows) - with_active, len(rows)):
        own = where[i, before]
        out[i]["active"] = indices[own][active[own]].sort().values.tolist()
    return out


def _scores_of_rows(store: Store, site: str, split: str, rows: torch.Tensor, dictionary: Dictionary,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`unit_scores` (values, units, active) [len(rows), k] of the given sorted, unique global rows: one
    pass picking them out; batches with fewer slots are padded with inactive ones."""
    parts = [_scores(dictionary, x) for _, x in select_rows(store.batches(site, split, batch_size), rows)]
    if not parts:
        return torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool)
    width = max(v.shape[1] for v, _, _ in parts)

    def pad(t, fill):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    return (torch.cat([pad(v.float(), 0.0) for v, _, _ in parts]), torch.cat([pad(i, 0) for _, i, _ in parts]),
            torch.cat([pad(a, False) for _, _, a in parts]))


@torch.no_grad()
def logit_lens(model, directions: torch.Tensor, final_norm: str, k: int = 10, shortlist: int = 64) -> dict:
    """Top and bottom k tokens of unembedding(final_norm(d)) for each direction d ([U, d_model]).

    The norm runs in the model's dtype. Where bfloat16 products are faster (CUDA; CPUs with native
    bf16: 3x), the full-vocabulary product runs in bfloat16 only to shortlist `shortlist` candidates
    per end; their logits are then recomputed in float32, so the tokens and values are exact unless a
    true top-k token falls outside the bfloat16 top-64, which needs a rounding error larger than the
    gap between the k-th and the 64th logit. Elsewhere the shortlist is taken in float32.
    """
    norm = model.get_submodule(final_norm)
    unembed = model.get_output_embeddings().weight
    exact, rough = _unembedding(unembed, bfloat16_is_faster(str(unembed.device)))
    shortlist = min(max(shortlist, k), exact.shape[0])
    out: dict[str, list] = {"top_ids": [], "top_logits": [], "bottom_ids": [], "bottom_logits": []}
    for chunk in directions.split(256):
        normed = norm(chunk.to(unembed.device, unembed.dtype)).float()
        approx = normed.to(rough.dtype) @ rough.T
        for end, largest in (("top", True), ("bottom", False)):
            candidates = approx.topk(shortlist, dim=1, largest=largest).indices
            logits = torch.einsum("cd,csd->cs", normed, exact[candidates])
            best = logits.topk(k, dim=1, largest=largest)
            out[f"{end}_ids"].append(candidates.gather(1, best.indices))
            out[f"{end}_logits"].append(best.values)
    return {key: torch.cat(parts).cpu() for key, parts in out.items()}


@functools.lru_cache(maxsize=1)
def _unembedding(weight: torch.Tensor, low_precision: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 and shortlisting (bfloat16, or the same float32) copies of the unembedding, made once for
    all the dictionaries of a model."""
    exact = weight.detach().float()
    return exact, weight.detach().bfloat16() if low_precision else exact


def top_tokens(unit: dict, most: int = 4) -> list[str]:
    """The tokens a unit fires on most often among its top examples (of its interpretation), commonest first."""
    counts: dict[str, int] = {}
    for e in unit["top"]:
        token = e["tokens"][e["target"]]
        counts[token] = counts.get(token, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:most]


def token_labels(folder, most: int = 3) -> dict[int, str]:
    """Each unit's `most` commonest activating tokens joined by " · ", from the dictionary folder's
    interpretation.json (empty when it has none)."""
    import json
    from pathlib import Path

    path = Path(folder) / "interpretation.json"
    if not path.exists():
        return {}
    return {unit["unit"]: " · ".join(top_tokens(unit, most)) for unit in json.loads(path.read_text())["units"]}


def top_token_share(token_ids: list[int]) -> float | None:
    """The share of a unit's examples on its most common token (None: no examples)."""
    if not token_ids:
        return None
    return int(torch.bincount(torch.tensor(token_ids)).max()) / len(token_ids)


def token_entropy(token_ids: list[int]) -> float | None:
    """Entropy (nats) of the tokens a unit fires on: 0 when it fires on a single token (None: no examples)."""
    if not token_ids:
        return None
    counts = torch.bincount(torch.tensor(token_ids)).double()
    p = counts[counts > 0] / counts.sum()
    return max(0.0, float(-(p * p.log()).sum()))  # never -0.0


def interpret_dictionary(store: Store, folder, split: str = "eval", n_top: int = 20, intervals: int = 5,
                         per_interval: int = 5, n_random: int = 10, before: int = 8, after: int = 3,
                         model=None, tokenizer=None, lens_k: int = 8, batch_size: int = 4096, seed: int = 0,
                         embed=None, baseline_contexts: int = 200, progress: bool = False) -> dict:
    """The interpretation of one saved dictionary: per unit its statistics, examples with token windows,
    logit lens (when a model is given), token entropy and top-token share, and with a sentence
    embedder `embed` (coherence.Embedder) the coherence z-score of its top contexts against
    `baseline_contexts` random contexts; and the dictionary's monosemanticity summary. JSON-ready."""
    from pathlib import Path

    from dictlab.data import distributed
    from dictlab.data.io import read_json
    from dictlab.data.lm import ARCHITECTURES
    from dictlab.dictionaries import load_dictionary

    folder = Path(folder)
    site = read_json(folder / "config.json")["site"]
    dictionary = load_dictionary(folder).on_device(distributed.device())  # encodes where the model runs
    ex = unit_examples(dictionary, lambda: store.batches(site, split, batch_size), n_top, intervals, per_interval,
                       n_random, seed, progress)
    picked = [(u, "top", i, int(r)) for u in range(dictionary.n_latents) for i, r in enumerate(ex["top_rows"][u])
              if r >= 0]
    picked += [(u, "samples", i, int(r)) for u in range(dictionary.n_latents)
               for i, slot in enumerate(ex["samples"][u]) for r in slot if r >= 0]
    # random rows: the coherence baseline, and the explainer's non-activating candidates; their windows
    # are read in the same passes as the examples'
    g = torch.Generator().manual_seed(seed)
    random_rows = torch.randperm(ex["n_rows"], generator=g)[:baseline_contexts].sort().values
    rows = torch.cat([torch.tensor([p[3] for p in picked], dtype=torch.long), random_rows])
    units = torch.cat([torch.tensor([p[0] for p in picked], dtype=torch.long), torch.zeros_like(random_rows)])
    shown = windows(store, site, split, rows, before, after, dictionary, units, batch_size,
                    with_active=len(random_rows)) if len(rows) else []
    shown, random_shown = shown[:len(picked)], shown[len(picked):]
    vocab: dict[int, str] = {}

    def text(ids):
        if tokenizer is None:
            return [str(i) for i in ids]
        for i in ids:
            if i not in vocab:
                vocab[i] = tokenizer.decode([i])
        return [vocab[i] for i in ids]

    peak = [float(v) if math.isfinite(v) else None for v in ex["max"].tolist()]  # None: never fired
    out_units = [{"unit": u, "frequency": float(ex["frequency"][u]), "max": peak[u],
                  "histogram": ex["histogram"][u].tolist(), "top": [], "samples": [[] for _ in ex["samples"][u]]}
                 for u in range(dictionary.n_latents)]
    for (u, where, i, _), w in zip(picked, shown):
        example = {"context": w["context"], "pos": w["pos"], "target": w["target"], "tokens": text(w["tokens"]),
                   "scores": [round(s, 5) for s in w["scores"]], "token_id": w["tokens"][w["target"]]}
        (out_units[u]["top"] if where == "top" else out_units[u]["samples"][i]).append(example)
    for unit in out_units:
        examples = [e["token_id"] for e in unit["top"] + [e for slot in unit["samples"] for e in slot]]
        unit["token_entropy"], unit["top_token_share"] = token_entropy(examples), top_token_share(examples)
    if model is not None:
        lens = logit_lens(model, dictionary.directions, ARCHITECTURES[model.config.model_type].final_norm, lens_k)
        for u, unit in enumerate(out_units):
            unit["logit_lens"] = {"top": list(zip(text(lens["top_ids"][u].tolist()),
                                                  [round(v, 3) for v in lens["top_logits"][u].tolist()])),
                                  "bottom": list(zip(text(lens["bottom_ids"][u].tolist()),
                                                     [round(v, 3) for v in lens["bottom_logits"][u].tolist()]))}
    baseline = [{"tokens": text(w["tokens"]), "target": w["target"], "active": w["active"]} for w in random_shown]
    if embed is not None:
        from dictlab.interpret.coherence import coherence

        groups = [["".join(e["tokens"]) for e in unit["top"]] for unit in out_units]
        for unit, z in zip(out_units, coherence(groups, ["".join(w["tokens"]) for w in baseline], embed)):
            unit["coherence"] = z
    spec = store.manifest["spec"]  # where the examples come from (a Neuronpedia export states it)
    source = {"model": spec["model"], "corpus": spec["corpus"].get("source"),
              "context_length": spec["extract"]["context_length"],
              "contexts": store.manifest["splits"][split].get("contexts")}
    return {"dictionary": str(folder), "site": site, "split": split, "kind": ex["kind"], "n_rows": ex["n_rows"],
            "source": source, "baseline": baseline, "summary": monosemanticity(out_units), "units": out_units}


COHERENT_Z = 2.0  # a group this far above random groups of contexts: one-sided p ≈ 0.02
SINGLE_TOKEN_SHARE = 0.5
DETECTED = 0.8


def monosemanticity(units: list[dict]) -> dict:
    """A dictionary's summary of its units' offline scores. Over the units that fire: the median token
    entropy; the fraction of single-token units (≥ half their examples on one token); the median
    coherence z and the fraction coherent (z ≥ 2); with explanations, the mean detection score and the
    fraction detected (≥ 0.8); and the fraction monosemantic: single-token or coherent (or detected)."""
    firing = [u for u in units if u["frequency"] > 0]

    def scored(key):
        return [u for u in firing if u.get(key) is not None]

    def median(values):
        return statistics.median(values) if values else None

    def fraction(group, test):
        return sum(map(test, group)) / len(group) if group else None

    def clean(u):
        return ((u.get("top_token_share") or 0) >= SINGLE_TOKEN_SHARE or (u.get("coherence") or -math.inf) >= COHERENT_Z
                or (u.get("detection") or 0) >= DETECTED)

    out = {"units": len(units), "units_firing": len(firing),
           "median_token_entropy": median([u["token_entropy"] for u in scored("token_entropy")]),
           "single_token_fraction": fraction(scored("top_token_share"),
                                             lambda u: u["top_token_share"] >= SINGLE_TOKEN_SHARE),
           "median_coherence": median([u["coherence"] for u in scored("coherence")]),
           "coherent_fraction": fraction(scored("coherence"), lambda u: u["coherence"] >= COHERENT_Z),
           "monosemantic_fraction": fraction(firing, clean)}
    detected = scored("detection")
    if detected:
        out["mean_detection"] = sum(u["detection"] for u in detected) / len(detected)
        out["detected_fraction"] = fraction(detected, lambda u: u["detection"] >= DETECTED)
    return out

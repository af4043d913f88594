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

import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from dictlab.dictionaries.base import Dictionary
from dictlab.store import Store, select_rows

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
        u, v, r = _active(*dictionary.unit_scores(x), n_rows)
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
        u, v, r = _active(*dictionary.unit_scores(x), offset)
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
            dictionary: Dictionary, units: torch.Tensor, batch_size: int = 4096) -> list[dict]:
    """For each example row (with the unit it illustrates): the tokens of its context from `before`
    rows earlier to `after` rows later, and the unit's score on each of them."""
    columns = ("token", "context", "pos")
    parts = [{c: b[c] for c in columns} for b in store.batches(site, split, 1 << 16, columns=columns)]  # drop x
    meta = {c: torch.cat([b[c] for b in parts]) for c in columns}
    n = len(meta["token"])
    span = torch.arange(-before, after + 1)
    window_rows = (rows.unsqueeze(1) + span).clamp(0, n - 1)
    same = (meta["context"][window_rows] == meta["context"][rows].unsqueeze(1)) & \
        ((rows.unsqueeze(1) + span) >= 0) & ((rows.unsqueeze(1) + span) < n)
    needed = torch.unique(window_rows[same])
    scores = _scores_of_rows(store, site, split, needed, dictionary, batch_size)
    out = []
    for i in range(len(rows)):
        w = window_rows[i][same[i]]
        unit = int(units[i])
        out.append({"row": int(rows[i]), "context": int(meta["context"][rows[i]]), "pos": int(meta["pos"][rows[i]]),
                    "tokens": meta["token"][w].tolist(), "target": int((w == rows[i]).nonzero()[0]),
                    "scores": [scores[int(j)].get(unit, 0.0) for j in w],
                    "active": sorted(scores[int(rows[i])])})  # every unit active at the row itself
    return out


def _scores_of_rows(store: Store, site: str, split: str, rows: torch.Tensor, dictionary: Dictionary,
                    batch_size: int) -> dict[int, dict[int, float]]:
    """{row: {unit: score}} for the given (sorted, unique) global rows: one pass picking them out."""
    out = {}
    for picked, x in select_rows(store.batches(site, split, batch_size), rows):
        values, indices, active = dictionary.unit_scores(x)
        for row, vs, us, on in zip(picked.tolist(), values.tolist(), indices.tolist(), active.tolist()):
            out[row] = {u: v for u, v, a in zip(us, vs, on) if a}
    return out


@torch.no_grad()
def logit_lens(model, directions: torch.Tensor, final_norm: str, k: int = 10) -> dict:
    """Top and bottom k tokens of unembedding(final_norm(d)) for each direction d ([U, d_model])."""
    norm = model.get_submodule(final_norm)
    unembed = model.get_output_embeddings().weight
    top_v, top_i, bot_v, bot_i = [], [], [], []
    for chunk in directions.split(256):
        logits = norm(chunk.to(unembed.dtype)).float() @ unembed.float().T
        t = logits.topk(k, dim=1)
        b = logits.topk(k, dim=1, largest=False)
        top_v.append(t.values), top_i.append(t.indices), bot_v.append(b.values), bot_i.append(b.indices)
    return {"top_ids": torch.cat(top_i), "top_logits": torch.cat(top_v), "bottom_ids": torch.cat(bot_i),
            "bottom_logits": torch.cat(bot_v)}


def token_entropy(token_ids: list[int]) -> float | None:
    """Entropy (nats) of the tokens a unit fires on: 0 when it fires on a single token (None: no examples)."""
    if not token_ids:
        return None
    counts = torch.bincount(torch.tensor(token_ids)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def interpret_dictionary(store: Store, folder, split: str = "eval", n_top: int = 10, intervals: int = 5,
                         per_interval: int = 2, n_random: int = 10, before: int = 8, after: int = 3,
                         model=None, tokenizer=None, lens_k: int = 8, batch_size: int = 4096, seed: int = 0,
                         encoder=None, baseline_contexts: int = 200, progress: bool = False) -> dict:
    """The interpretation of one saved dictionary: per unit its statistics, examples with token windows,
    logit lens (when a model is given), token entropy, and with a sentence `encoder` the coherence
    z-score of its top contexts (coherence.py) against `baseline_contexts` random contexts; JSON-ready."""
    from pathlib import Path

    from dictlab.dictionaries import load_dictionary
    from dictlab.io import read_json
    from dictlab.lm import ARCHITECTURES

    folder = Path(folder)
    site = read_json(folder / "config.json")["site"]
    dictionary = load_dictionary(folder)
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
    shown = windows(store, site, split, rows, before, after, dictionary, units, batch_size) if len(rows) else []
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
        examples = unit["top"] + [e for slot in unit["samples"] for e in slot]
        unit["token_entropy"] = token_entropy([e["token_id"] for e in examples])
    if model is not None:
        lens = logit_lens(model, dictionary.directions, ARCHITECTURES[model.config.model_type].final_norm, lens_k)
        for u, unit in enumerate(out_units):
            unit["logit_lens"] = {"top": list(zip(text(lens["top_ids"][u].tolist()),
                                                  [round(v, 3) for v in lens["top_logits"][u].tolist()])),
                                  "bottom": list(zip(text(lens["bottom_ids"][u].tolist()),
                                                     [round(v, 3) for v in lens["bottom_logits"][u].tolist()]))}
    baseline = [{"tokens": text(w["tokens"]), "target": w["target"], "active": w["active"]} for w in random_shown]
    if encoder is not None:
        from dictlab.coherence import coherence

        groups = [["".join(e["tokens"]) for e in unit["top"]] for unit in out_units]
        for unit, z in zip(out_units, coherence(groups, ["".join(w["tokens"]) for w in baseline], encoder)):
            unit["coherence"] = z
    entropies = [u["token_entropy"] for u in out_units if u["token_entropy"] is not None]
    coherent = [u["coherence"] for u in out_units if u.get("coherence") is not None]
    return {"dictionary": str(folder), "site": site, "split": split, "kind": ex["kind"], "n_rows": ex["n_rows"],
            "baseline": baseline,
            "summary": {"units": dictionary.n_latents, "units_firing": int((ex["frequency"] > 0).sum()),
                        "mean_token_entropy": sum(entropies) / len(entropies) if entropies else None,
                        "mean_coherence": sum(coherent) / len(coherent) if coherent else None},
            "units": out_units}

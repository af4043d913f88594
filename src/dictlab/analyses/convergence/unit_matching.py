"""Dictionary-level convergence of two models.

Across two models (any widths, any tokenizers): the units of A's dictionary and of B's are matched by
the Pearson correlation of their activity (Dictionary.unit_activity: codes of latents, membership of
clusters) over the same aligned tokens — each unit's best match, and the one-to-one Hungarian matching.
Reported over the live units (active on at least `min_active` of the tokens):
- the share of A's units whose best match has r above `threshold`, and the same for the one-to-one
  matching; the mean best r;
- replication: the one-to-one matching is fitted again on the even-numbered documents alone, and its
  pairs' r and the Jaccard similarity of the matched active sets per token,
  |m(S_A) ∩ S_B| / |m(S_A) ∪ S_B| (S: the matched units active on a token, m: the matching), are
  measured on the odd-numbered documents (tokens where neither is active are skipped);
- examples: the best-matched pairs, and frequent units of either side without a match, with the
  contexts where they are most active.
Each comes with its permutation null (documents shuffled against each other, position by position):
chance correlations of thousands of units reach a sizeable best r, and the null says how sizeable.

One residual space (base vs instruct of one size, same tokenizer): one dictionary applied to both
models' activations at its site; the Jaccard similarity of their active-unit sets per token and per
prompt (the union over a prompt's tokens), and the dictionary's FVU and L0 on each model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError
from dictlab.measures.metrics import evaluate_reconstruction
from dictlab.measures.similarity import match_units
from dictlab.measures.stats import bootstrap_ratio, tested, unit_rows


def activity(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """Dense [N, n_units] activity of every unit (codes for latents, 1 on members for clusters)."""
    values, units, active = dictionary.unit_activity(x.float())
    out = torch.zeros(x.shape[0], dictionary.n_latents)
    return out.scatter_(1, units, torch.where(active, values, torch.zeros_like(values)).float())


def _standardised(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    centred = a - a.mean(0)
    scale = centred.norm(dim=0)
    return (centred / torch.where(scale > 0, scale, 1.0)).float()  # a silent unit: all zeros, r = 0 with all


def _correlation(za: torch.Tensor, zb: torch.Tensor) -> np.ndarray:
    return (za.T @ zb).double().numpy()


def _summary(r: np.ndarray, threshold: float) -> dict:
    m = match_units(r, threshold)
    return {"best_above": m["best_above"], "one_to_one_above": m["one_to_one_above"],
            "mean_best_r": float(m["best_r"].mean())}


def _jaccard_per_doc(ma: torch.Tensor, mb: torch.Tensor, n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document: the sum of per-token Jaccard of two boolean [N, n] matrices, and its token count
    (tokens where both are empty skipped)."""
    inter = (ma & mb).sum(1).double()
    union = ma.sum(1).double() + mb.sum(1).double() - inter
    keep = union > 0
    jaccard = torch.where(keep, inter / union.clamp_min(1), 0.0)
    return jaccard.view(n_docs, -1).sum(1).numpy(), keep.view(n_docs, -1).sum(1).double().numpy()


def _jaccard_test(sums: np.ndarray, counts: np.ndarray, null: list[float], n_boot: int, level: float,
                  seed: int) -> dict:
    """The record of a Jaccard similarity (per-unit sums and counts of tokens or prompts): its test against
    the null, and its bootstrap interval over the units."""
    observed, low, high = bootstrap_ratio(sums, counts, n_boot, level, seed)
    return {**tested(observed, null), "low": low, "high": high}


def match_dictionaries(dict_a: Dictionary, x_a: torch.Tensor, dict_b: Dictionary, x_b: torch.Tensor, n_docs: int,
                       threshold: float = 0.5, min_active: int = 5, permutations: int = 200, n_boot: int = 1000,
                       level: float = 0.95, examples: int = 5, context: Callable | None = None, seed: int = 0) -> dict:
    """Match A's units to B's on row-aligned activations x_a [N, d_A], x_b [N, d_B] (document-major,
    N = n_docs·m). `context(side, row)` gives a row's text snippet for the examples."""
    if x_a.shape[0] != x_b.shape[0] or x_a.shape[0] % n_docs:
        raise DictlabError(f"the two sides have {x_a.shape[0]} and {x_b.shape[0]} rows; they must be aligned, "
                           f"{n_docs} documents of equal length")
    if n_docs < 4:
        raise DictlabError(f"matching with replication needs at least 4 documents, got {n_docs}")
    per_doc = x_a.shape[0] // n_docs
    act_a, act_b = activity(dict_a, x_a), activity(dict_b, x_b)
    live_a = np.flatnonzero(((act_a != 0).sum(0) >= min_active).numpy())
    live_b = np.flatnonzero(((act_b != 0).sum(0) >= min_active).numpy())
    if not len(live_a) or not len(live_b):
        raise DictlabError(f"no unit of {'A' if not len(live_a) else 'B'} is active on {min_active} or more of the "
                           f"{x_a.shape[0]} aligned tokens: use more text or a lower min_active")
    act_a, act_b = act_a[:, live_a], act_b[:, live_b]
    za, zb = _standardised(act_a), _standardised(act_b)
    r = _correlation(za, zb)
    observed = _summary(r, threshold)
    rng = np.random.default_rng(seed)
    nulls = {key: [] for key in observed}
    # replication: matched on the even documents, measured on the odd ones
    even, odd = np.arange(0, n_docs, 2), np.arange(1, n_docs, 2)
    rows_even, rows_odd = torch.as_tensor(unit_rows(even, per_doc)), torch.as_tensor(unit_rows(odd, per_doc))
    rows_fit, cols_fit = match_units(_correlation(_standardised(act_a[rows_even]),
                                                  _standardised(act_b[rows_even])))["one_to_one"].T
    held_a, held_b = _standardised(act_a[rows_odd]), _standardised(act_b[rows_odd])
    held_r = (held_a[:, rows_fit] * held_b[:, cols_fit]).sum(0).double().numpy()
    on_a, on_b = act_a[rows_odd][:, rows_fit] != 0, act_b[rows_odd][:, cols_fit] != 0
    jac_sum, jac_count = _jaccard_per_doc(on_a, on_b, len(odd))
    null_held, null_jaccard = [], []
    for _ in range(permutations):
        docs = rng.permutation(n_docs)
        for key, v in _summary(_correlation(za, zb[torch.as_tensor(unit_rows(docs, per_doc))]), threshold).items():
            nulls[key].append(v)
        odd_perm = torch.as_tensor(unit_rows(rng.permutation(len(odd)), per_doc))
        null_held.append(float((held_a[:, rows_fit] * held_b[odd_perm][:, cols_fit]).sum(0).double().mean()))
        s, c = _jaccard_per_doc(on_a, on_b[odd_perm], len(odd))
        null_jaccard.append(float(s.sum() / max(c.sum(), 1)))
    out = {"live_a": int(len(live_a)), "live_b": int(len(live_b)), "units_a": dict_a.n_latents,
           "units_b": dict_b.n_latents, "tokens": int(x_a.shape[0]), "threshold": threshold,
           **{key: tested(value, nulls[key]) for key, value in observed.items()},
           "replicated_r": tested(float(held_r.mean()), null_held),
           "replicated_above": float((held_r > threshold).mean()),
           "jaccard_per_token": _jaccard_test(jac_sum, jac_count, null_jaccard, n_boot, level, seed)}
    out["examples"] = _examples(r, live_a, live_b, act_a, act_b, threshold, examples, context)
    return out


def _examples(r, live_a, live_b, act_a, act_b, threshold, most, context) -> dict:
    rows, cols = match_units(r, threshold)["one_to_one"].T
    order = np.argsort(-r[rows, cols])[:most]

    def tops(side: str, act: torch.Tensor, j: int, n: int = 3) -> list:
        column = act[:, j]
        best = torch.argsort(column, descending=True)[:n]
        return [context(side, int(i)) for i in best if column[i] != 0] if context else []

    matched = [{"a": int(live_a[rows[i]]), "b": int(live_b[cols[i]]), "r": float(r[rows[i], cols[i]]),
                "a_contexts": tops("a", act_a, int(rows[i])), "b_contexts": tops("b", act_b, int(cols[i]))}
               for i in order]
    unmatched = {}
    for side, act, best_r, live in (("a", act_a, r.max(1), live_a), ("b", act_b, r.max(0), live_b)):
        frequency = (act != 0).sum(0).numpy()
        lonely = [j for j in np.argsort(-frequency) if best_r[j] < threshold][:most]
        unmatched[side] = [{"unit": int(live[j]), "best_r": float(best_r[j]), "active_tokens": int(frequency[j]),
                            "contexts": tops(side, act, int(j))} for j in lonely]
    return {"matched": matched, "unmatched_a": unmatched["a"], "unmatched_b": unmatched["b"]}


def shared_dictionary(dictionary: Dictionary, x_a: torch.Tensor, x_b: torch.Tensor, n_docs: int,
                      prompts_a: list[torch.Tensor] | None = None, prompts_b: list[torch.Tensor] | None = None,
                      permutations: int = 200, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """One dictionary applied to two models' activations at one site: the Jaccard similarity of their
    active-unit sets per token (row-aligned x_a, x_b, document-major) and per prompt (the union over the
    prompt's tokens; prompts_a[i], prompts_b[i]: [T_i, d] of one prompt), and its FVU and L0 on each."""
    if x_a.shape != x_b.shape:
        raise DictlabError(f"one dictionary for two models needs one residual space: shapes {tuple(x_a.shape)} and "
                           f"{tuple(x_b.shape)}")
    per_doc = x_a.shape[0] // n_docs
    on_a, on_b = activity(dictionary, x_a) != 0, activity(dictionary, x_b) != 0
    s, c = _jaccard_per_doc(on_a, on_b, n_docs)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(permutations):
        ps, pc = _jaccard_per_doc(on_a, on_b[torch.as_tensor(unit_rows(rng.permutation(n_docs), per_doc))], n_docs)
        null.append(float(ps.sum() / max(pc.sum(), 1)))
    out = {"tokens": int(x_a.shape[0]), "jaccard_per_token": _jaccard_test(s, c, null, n_boot, level, seed)}
    for side, x in (("a", x_a), ("b", x_b)):
        result, _ = evaluate_reconstruction(dictionary, [x.float()])
        out[f"fvu_{side}"], out[f"l0_{side}"] = result.fvu, result.l0
    if prompts_a:
        sets_a = torch.stack([(activity(dictionary, p) != 0).any(0) for p in prompts_a])
        sets_b = torch.stack([(activity(dictionary, p) != 0).any(0) for p in prompts_b])
        ps, pc = _jaccard_per_doc(sets_a, sets_b, len(prompts_a))
        null = []
        for _ in range(permutations):
            ns, nc = _jaccard_per_doc(sets_a, sets_b[torch.as_tensor(rng.permutation(len(prompts_a)))], len(prompts_a))
            null.append(float(ns.sum() / max(nc.sum(), 1)))
        out["jaccard_per_prompt"] = {**_jaccard_test(ps, pc, null, n_boot, level, seed), "prompts": len(prompts_a)}
    return out

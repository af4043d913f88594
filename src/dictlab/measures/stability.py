"""Cross-seed stability: do two fits of one entry, differing only in their seed, learn the same units?

Units are compared by the cosine of their directions (an SAE's decoder rows; a clustering's centroids
taken about their own mean, since raw centroids far from the origin all point the same way), matched one
to one by the Hungarian algorithm (`similarity.match_units`). Reported, over the units of the first fit:
the share whose matched unit has cosine ≥ 0.7 and ≥ 0.9, and the mean matched cosine; and the same
against a null: as many random directions, with the second fit's norms, drawn isotropically (seeded).
A dictionary against itself scores 1.0; two unrelated random dictionaries score what the null scores.
"""

from __future__ import annotations

import numpy as np
import torch

from dictlab.dictionaries.base import Dictionary
from dictlab.measures.similarity import match_units

THRESHOLDS = (0.7, 0.9)


def unit_directions(dictionary: Dictionary) -> torch.Tensor:
    """[n_units, d] float64 directions to compare: decoder rows, or centroids about their mean."""
    directions = dictionary.directions.detach().double().cpu()
    return directions - directions.mean(0) if dictionary.unit_kind == "cluster" else directions


def _matched(a: torch.Tensor, b: torch.Tensor) -> dict:
    unit = [t / t.norm(dim=1, keepdim=True).clamp_min(1e-300) for t in (a, b)]
    r = match_units((unit[0] @ unit[1].T).numpy())["one_to_one_r"]
    out = {f"above_{t}": float((r >= t).sum() / len(a)) for t in THRESHOLDS}
    return {**out, "mean_cosine": float(r.sum() / len(a))}


def stability(a: Dictionary, b: Dictionary, seed: int = 0) -> dict:
    """How many of a's units b learned too: {above_0.7, above_0.9, mean_cosine} and the null's."""
    da, db = unit_directions(a), unit_directions(b)
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(db.shape, generator=g, dtype=torch.float64)
    random *= db.norm(dim=1, keepdim=True) / random.norm(dim=1, keepdim=True)
    observed, null = _matched(da, db), _matched(da, random)
    return {**observed, **{f"null_{k}": v for k, v in null.items()}}


def mean_over_pairs(records: list[dict]) -> dict:
    """The mean of each number over the pairs of seeds (three seeds: three pairs)."""
    return {k: float(np.mean([r[k] for r in records])) for k in records[0]}

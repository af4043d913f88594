"""Feature splitting: how the units of a narrower dictionary divide among those of a wider one.

For a narrow dictionary A and a wide one B fitted on the same site, each unit b of B gets a parent
in A two ways:
  by decoder cosine    parent(b) = argmax_a cos(d_a, d_b)
  by co-activation     parent(b) = argmax_a P(a active | b active), counted over a split
and a parent "splits" when two or more children choose it by both. Chained over K = 64 → 128 → 256
or SAE widths, this is the parent → children tree.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dictlab.dictionaries.base import Dictionary


def _active(dictionary: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """[N, units] 0/1 float: which units are active on each row."""
    _, indices, active = dictionary.unit_scores(x)
    return torch.zeros(x.shape[0], dictionary.n_latents).scatter_(1, indices, active.float())


def co_activation(narrow: Dictionary, wide: Dictionary, batches: Iterable[torch.Tensor]):
    """[n_narrow, n_wide] counts of rows where both units are active, and [n_wide] rows each wide unit fires on."""
    counts = torch.zeros(narrow.n_latents, wide.n_latents, dtype=torch.float64)
    fires = torch.zeros(wide.n_latents, dtype=torch.float64)
    for x in batches:
        on = _active(wide, x)
        counts += (_active(narrow, x).T @ on).double()
        fires += on.sum(0).double()
    return counts, fires


def split_tree(narrow: Dictionary, wide: Dictionary, batches: Iterable[torch.Tensor]) -> dict:
    """Each wide unit's parent by decoder cosine and by co-activation, and the parents that split."""
    cos = torch.nn.functional.normalize(narrow.directions, dim=1) @ \
        torch.nn.functional.normalize(wide.directions, dim=1).T
    counts, fires = co_activation(narrow, wide, batches)
    by_cos, by_coact = cos.argmax(0), counts.argmax(0)
    fired = fires > 0
    p_coact = counts.max(0).values / fires.clamp_min(1)
    children = [{"unit": b, "parent_by_cosine": int(by_cos[b]), "cosine": float(cos[by_cos[b], b]),
                 "parent_by_coactivation": int(by_coact[b]) if fired[b] else None,
                 "p_coactivation": float(p_coact[b]) if fired[b] else None}
                for b in range(wide.n_latents)]
    agree = [c for c in children if c["parent_by_coactivation"] == c["parent_by_cosine"]]
    family: dict[int, list[int]] = {}
    for c in agree:
        family.setdefault(c["parent_by_cosine"], []).append(c["unit"])
    splits = {a: kids for a, kids in family.items() if len(kids) >= 2}
    return {"children": children, "splits": {str(a): kids for a, kids in sorted(splits.items())},
            "agreement": len(agree) / max(1, int(fired.sum())), "split_fraction": len(splits) / narrow.n_latents}

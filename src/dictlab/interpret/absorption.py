"""Feature absorption on the first-letter task, on the store's own tokens.

For each letter, a logistic-regression probe on the activations predicts "this token is a word
starting with that letter" (tokens with a leading space and a letter; the rest are negatives). The
letter's main units are the `k_main` units whose decoder directions are most cosine-similar to the
probe. On every token the probe gets right and the main units leave silent, the unit with the largest
probe projection (activation × cos(decoder, probe)) absorbs the letter when its cosine is at least
`cos_threshold` (0.025) and its projection at least `projection_share` (0.4) of the projection of all
active units, the thresholds SAEBench uses. Absorption rate = absorbed tokens / the probe's true
positives. A dictionary that encodes letters cleanly has rate 0.

This reads activations and tokens from the store instead of prompting the model with spelling
prompts, so it measures absorption of the letter feature at every word position.
"""

from __future__ import annotations

from collections import Counter

import torch

from dictlab.dictionaries.base import Dictionary


def first_letters(tokens: list[str]) -> list[str | None]:
    """The first letter (lower case) of each word token (leading space, then a letter); None otherwise."""
    out = []
    for t in tokens:
        word = t[1:] if t[:1] in (" ", "▁", "Ġ") else None
        out.append(word[0].lower() if word and word[0].isascii() and word[0].isalpha() else None)
    return out


def train_probes(x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 0.05, l2: float = 1e-4,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent logistic-regression probes for the columns of boolean labels y [N, L], trained together
    (one [N, d] x [d, L] product per step; each fitted on standardised inputs, class-balanced).
    Returns unit directions [L, d] and offsets [L]: probe l predicts x·d_l + c_l > 0 in the activations'
    own coordinates."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    positive = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y, 0.5 / positive, 0.5 / (1 - positive))  # balanced classes, per probe
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float(), weight=weight,
                                                                    reduction="none").mean(0).sum()
        (loss + l2 * (w * w).sum()).backward()
        opt.step()
    direction = (w.detach() / std.unsqueeze(1)).T  # logit = x·direction + offset
    offset = b.detach() - (w.detach() * (mean / std).unsqueeze(1)).sum(0)
    norm = direction.norm(dim=1)
    return direction / norm.unsqueeze(1), offset / norm


def train_probe(x: torch.Tensor, y: torch.Tensor, **settings) -> tuple[torch.Tensor, float]:
    """One probe for boolean labels y [N] (see train_probes): (unit direction, offset)."""
    direction, offset = train_probes(x, y.unsqueeze(1), **settings)
    return direction[0], float(offset[0])


def letter_probes(x: torch.Tensor, letters: list[str | None], min_tokens: int = 20) -> dict:
    """A probe per letter with at least `min_tokens` word tokens: {letter: (direction, offset)}. They
    depend only on the activations, so one set serves every dictionary of a site."""
    counts = Counter(c for c in letters if c is not None)
    kept = sorted(c for c, n in counts.items() if n >= min_tokens)
    if not kept:
        return {}
    y = torch.tensor([[t == c for c in kept] for t in letters])
    directions, offsets = train_probes(x, y)
    return {c: (directions[i], float(offsets[i])) for i, c in enumerate(kept)}


def absorption(dictionary: Dictionary, x: torch.Tensor, letters: list[str | None], k_main: int = 1,
               cos_threshold: float = 0.025, projection_share: float = 0.4, min_tokens: int = 20,
               probes: dict | None = None) -> dict:
    """Absorption rate per letter and overall, measured on x. `probes`: from letter_probes, best on
    other rows of the same site (default: trained here on x, letters with at least `min_tokens`)."""
    if probes is None:
        probes = letter_probes(x, letters, min_tokens)
    decoder = torch.nn.functional.normalize(dictionary.directions.float(), dim=1)
    values, indices, active = dictionary.unit_scores(x)
    per_letter, absorbed_total, positives_total = {}, 0, 0
    for letter, (probe, bias) in probes.items():
        y = torch.tensor([c == letter for c in letters])
        predicted = (x @ probe + bias) > 0
        cos = decoder @ probe
        main = cos.topk(k_main).indices
        true_pos = predicted & y
        main_fires = (active & torch.isin(indices, main)).any(1)
        missed = (true_pos & ~main_fires).nonzero().squeeze(1)  # only these rows can be absorbed
        units = indices[missed]
        projection = torch.where(active[missed], values[missed] * cos[units], 0)  # per active unit
        total = projection.clamp_min(0).sum(1)
        best, slot = projection.max(1)
        best_cos = cos[units.gather(1, slot.unsqueeze(1)).squeeze(1)]
        n_absorbed = int(((best_cos >= cos_threshold) & (best >= projection_share * total) & (best > 0)).sum())
        positives = int(true_pos.sum())
        per_letter[letter] = {"true_positives": positives, "absorbed": n_absorbed,
                              "rate": n_absorbed / positives if positives else None,
                              "main_units": main.tolist(), "main_cos": cos[main].tolist()}
        absorbed_total += n_absorbed
        positives_total += positives
    return {"letters": per_letter, "rate": absorbed_total / positives_total if positives_total else None}

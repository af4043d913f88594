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

import torch

from dictlab.dictionaries.base import Dictionary


def first_letters(tokens: list[str]) -> list[str | None]:
    """The first letter (lower case) of each word token (leading space, then a letter); None otherwise."""
    out = []
    for t in tokens:
        word = t[1:] if t[:1] in (" ", "▁", "Ġ") else None
        out.append(word[0].lower() if word and word[0].isascii() and word[0].isalpha() else None)
    return out


def train_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 0.05, l2: float = 1e-4,
                seed: int = 0) -> tuple[torch.Tensor, float]:
    """A logistic-regression probe for binary labels y (fitted on standardised inputs, class-balanced):
    (unit direction d, bias c) with the prediction x·d + c > 0 in the activations' own coordinates."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    positive = y.float().mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y, 0.5 / positive, 0.5 / (1 - positive))  # balanced classes
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float(), weight=weight)
        (loss + l2 * (w @ w)).backward()
        opt.step()
    direction = w.detach() / std  # logit = x·direction + offset
    offset = float(b.detach() - (w.detach() * mean / std).sum())
    norm = float(direction.norm())
    return direction / norm, offset / norm


def absorption(dictionary: Dictionary, x: torch.Tensor, letters: list[str | None], k_main: int = 1,
               cos_threshold: float = 0.025, projection_share: float = 0.4, min_tokens: int = 20) -> dict:
    """Absorption rate per letter (letters with at least `min_tokens` word tokens) and overall."""
    decoder = torch.nn.functional.normalize(dictionary.directions, dim=1)
    values, indices, active = dictionary.unit_scores(x)
    per_letter, absorbed_total, positives_total = {}, 0, 0
    for letter in sorted({c for c in letters if c is not None}):
        y = torch.tensor([c == letter for c in letters])
        if int(y.sum()) < min_tokens:
            continue
        probe, bias = train_probe(x, y)
        predicted = (x @ probe + bias) > 0
        cos = decoder @ probe
        main = cos.topk(k_main).indices
        true_pos = predicted & y
        main_fires = (active & torch.isin(indices, main)).any(1)
        missed = true_pos & ~main_fires
        projection = torch.where(active, values * cos[indices], 0)  # [N, k] per active unit
        total = projection.clamp_min(0).sum(1)
        best, slot = projection.max(1)
        best_cos = cos[indices.gather(1, slot.unsqueeze(1)).squeeze(1)]
        absorbed = missed & (best_cos >= cos_threshold) & (best >= projection_share * total) & (best > 0)
        positives = int(true_pos.sum())
        per_letter[letter] = {"true_positives": positives, "absorbed": int(absorbed.sum()),
                              "rate": int(absorbed.sum()) / positives if positives else None,
                              "main_units": main.tolist(), "main_cos": cos[main].tolist()}
        absorbed_total += int(absorbed.sum())
        positives_total += positives
    return {"letters": per_letter, "rate": absorbed_total / positives_total if positives_total else None}

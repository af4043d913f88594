"""Steering and ablation through one dictionary's units at its site.

Edits of the site's activation x (every position but BOS), for a unit j with direction d_j and code
a_j(x):
    add       x + α·d_j
    clamp     x + (v − a_j(x))·d_j: the code set to v through the dictionary, the reconstruction error
              kept (the decoders are linear in the codes, so this is decode(edited codes) + (x − x̂))
    ablate    clamp to 0, or to the unit's mean code
    hold      (corrective) after any of these, each neighbour k is put back at its unsteered code:
              x' + Σ_k (a_k(x) − a_k(x'))·d_k, the correlated units a co-activation graph names
Measured on contexts against the unedited model, per context (for bootstrap intervals): the target
unit's code at the site after the edit, the drift of every other unit's code there, the KL of the
next-token distribution per token, the probability of the unit's logit-lens tokens, and the
next-token loss.
"""

from __future__ import annotations

import math

import torch

from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError
from dictlab.lm import ActivationCapture, Edit, SiteEditor, parse_site


def check_unit(dictionary: Dictionary, unit: int) -> None:
    if not 0 <= unit < dictionary.n_latents:
        raise DictlabError(f"unit {unit} is out of range: the dictionary has {dictionary.n_latents} units "
                           f"(0 to {dictionary.n_latents - 1})")


def steering_edit(dictionary: Dictionary, site: str, unit: int, alpha: float | None = None,
                  clamp: float | None = None, hold: list[int] | tuple = ()) -> Edit:
    """The Edit that adds α·d_j (or clamps a_j to `clamp`) at the site, holding the `hold` units."""
    check_unit(dictionary, unit)
    for k in hold:
        check_unit(dictionary, k)
    if (alpha is None) == (clamp is None):
        raise DictlabError("give exactly one of alpha (add α·d_j) and clamp (set the unit's code)")
    if not math.isfinite(alpha if alpha is not None else clamp):
        raise DictlabError(f"the steering value must be finite, got {alpha if alpha is not None else clamp}")
    directions = dictionary.directions.float()
    held = torch.tensor(list(hold), dtype=torch.long)

    def edit(read: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        flat = current[:, 1:].reshape(-1, current.shape[-1]).float()  # BOS stays as it is
        if alpha is not None:
            new = flat + alpha * directions[unit]
        else:
            new = flat + (clamp - dictionary.encode(flat)[:, unit]).unsqueeze(1) * directions[unit]
        if len(held):
            before, after = dictionary.encode(flat)[:, held], dictionary.encode(new)[:, held]
            new = new + (before - after) @ directions[held]
        out = current.clone()
        out[:, 1:] = new.reshape(current[:, 1:].shape).to(current.dtype)
        return out

    where = parse_site(site)
    return Edit(where, where, edit)


@torch.no_grad()
def measure(model, dictionary: Dictionary, site: str, batches: list[tuple], edit: Edit | None, unit: int,
            lens_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Per context: the unit's mean code after the edit minus before (`target`), the mean |change| of
    the other units' codes (`drift`), the mean KL(clean ‖ edited) per token, the change of the mean
    probability of `lens_ids`, and the change of the next-token loss. Hooks are removed afterwards,
    also when the forward pass fails."""
    where = parse_site(site)
    capture = ActivationCapture(model, [where])
    rows: dict[str, list] = {k: [] for k in ("target", "drift", "kl", "lens", "loss")}
    for ids, mask in batches:
        clean, clean_logits = _run(model, capture, where.name, ids, mask, None)
        edited, logits = _run(model, capture, where.name, ids, mask, edit)
        if not torch.isfinite(logits).all():
            raise DictlabError(f"the edit made the model's logits non-finite (unit {unit}); use a smaller value")
        valid = mask[:, 1:].bool()
        positions = mask.bool().clone()
        positions[:, 0] = False  # BOS is never edited
        a, b = dictionary.encode(clean[positions]), dictionary.encode(edited[positions])
        change = b - a
        context = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(positions)[positions]
        counts = torch.bincount(context, minlength=ids.shape[0]).clamp_min(1)
        others = torch.ones(dictionary.n_latents, dtype=torch.bool)
        others[unit] = False

        def per_context(values, rows_of=context, n=counts):
            return torch.zeros(len(n)).index_add_(0, rows_of, values.float()) / n

        rows["target"].append(per_context(change[:, unit]))
        rows["drift"].append(per_context(change[:, others].abs().mean(1)))
        log_p, log_q = clean_logits.log_softmax(-1), logits.log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        tokens = valid.sum(1).clamp_min(1)
        rows["kl"].append((kl * valid).sum(1) / tokens)
        if lens_ids:
            lens = log_q[..., lens_ids].exp().sum(-1) - log_p[..., lens_ids].exp().sum(-1)
            rows["lens"].append((lens * valid).sum(1) / tokens)
        targets = ids[:, 1:]
        nll_p = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll_q = -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        rows["loss"].append(((nll_q - nll_p) * valid).sum(1) / tokens)
    return {k: torch.cat(v) for k, v in rows.items() if v}


def _run(model, capture: ActivationCapture, name: str, ids, mask, edit: Edit | None):
    """The site's activation (after the edit) and the next-token logits of one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    editor = SiteEditor(model, [edit] if edit is not None else [])
    with editor:
        handles = capture._register(seen, stop_early=False)
        try:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        finally:
            for h in handles:
                h.remove()
    return seen[name].float(), logits


def bootstrap(values: torch.Tensor, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a percentile bootstrap interval over contexts."""
    g = torch.Generator().manual_seed(seed)
    draws = values[torch.randint(len(values), (n, len(values)), generator=g)].mean(1)
    low, high = torch.quantile(draws.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return float(values.mean()), float(low), float(high)


def neighbours(graph_dir, unit: int, most: int = 5) -> list[int]:
    """The units most correlated with `unit` (largest |r|) in a within-site graph written by `dictlab graph`."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(graph_dir) / "adjacency.safetensors"
    if not path.exists():
        raise DictlabError(f"{graph_dir} holds no adjacency.safetensors: run `dictlab graph` on the dictionary first")
    edges = load_file(str(path))
    touching = (edges["i"] == unit) | (edges["j"] == unit)
    other = torch.where(edges["i"][touching] == unit, edges["j"][touching], edges["i"][touching])
    order = edges["r"][touching].abs().argsort(descending=True)
    return other[order][:most].tolist()


def compare(model, dictionary: Dictionary, site: str, batches: list[tuple], units: list[int], alphas: list[float],
            held: dict[int, list[int]], lens: dict[int, list[int]] | None = None, seed: int = 0) -> list[dict]:
    """Plain and corrective steering (holding `held[unit]`) for every unit and α: each measure's mean
    over contexts with a 95% bootstrap interval, as (mean, low, high)."""
    rows = []
    for unit in units:
        for alpha in alphas:
            for mode, hold in (("plain", []), ("corrective", held.get(unit, []))):
                if mode == "corrective" and not hold:
                    continue
                out = measure(model, dictionary, site, batches, steering_edit(dictionary, site, unit, alpha=alpha,
                                                                              hold=hold), unit, (lens or {}).get(unit))
                rows.append({"unit": unit, "alpha": alpha, "mode": mode, "held": hold,
                             **{k: bootstrap(v, seed=seed) for k, v in out.items()}})
    return rows


def ablation(model, dictionary: Dictionary, site: str, batches: list[tuple], units: list[int],
             means: torch.Tensor | None = None, seed: int = 0) -> list[dict]:
    """Zero-ablate (or, with `means`, mean-ablate) each unit alone: the change of next-token loss and the
    drift of the other units' codes, ranked by the loss change (the unit's causal importance)."""
    rows = []
    for unit in units:
        value = 0.0 if means is None else float(means[unit])
        out = measure(model, dictionary, site, batches, steering_edit(dictionary, site, unit, clamp=value), unit)
        rows.append({"unit": unit, "ablated_to": value, "loss": bootstrap(out["loss"], seed=seed),
                     "drift": bootstrap(out["drift"], seed=seed), "kl": bootstrap(out["kl"], seed=seed)})
    return sorted(rows, key=lambda r: -r["loss"][0])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, edit: Edit | None, new_tokens: int = 20) -> tuple[str, float]:
    """Greedy continuation of `prompt` under the edit, and its perplexity under the unedited model.
    Without a KV cache: every step re-runs the whole sequence, so the edit sees every position."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(new_tokens):
        with SiteEditor(model, [edit] if edit is not None else []):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        if not torch.isfinite(logits).all():
            raise DictlabError("the edit made the model's logits non-finite; use a smaller value")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    log_p = model(input_ids=ids, use_cache=False).logits[:, start - 1:-1].float().log_softmax(-1)
    nll = -log_p.gather(-1, ids[:, start:].unsqueeze(-1)).mean()
    return tokenizer.decode(ids[0, start:]), float(nll.exp())

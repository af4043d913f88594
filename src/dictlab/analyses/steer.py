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
next-token distribution per token, the probability of the unit's logit-lens tokens, the
next-token loss, and with a dictionary at a later site, the drift of its codes. Every unit's
ablation is first estimated by attribution patching (one backward pass); the largest are then
ablated for real.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from dictlab.analyses.steering_controls import check_unit, diffmean_directions, diffmean_edit, random_edit
from dictlab.data.forward import SharedPrefix
from dictlab.data.lm import ActivationCapture, Edit, SiteEditor, parse_site
from dictlab.data.placement import Auto, model_device, to_device
from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError
from dictlab.measures.downstream import NextTokenScores, final_hidden, keep_bos
from dictlab.measures.stats import bootstrap_mean


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
    directions, device = dictionary.directions.float(), dictionary.device
    target, held = torch.tensor([unit], device=device), torch.tensor(list(hold), dtype=torch.long, device=device)
    clamped = None if clamp is None else torch.tensor([float(clamp)], device=device)

    def edit(read: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        flat = current.reshape(-1, current.shape[-1])
        if alpha is not None:
            new = flat + alpha * directions[unit]
        else:
            new = _set_codes(dictionary, flat, target, clamped, directions[target])
        if len(held):  # back at their unsteered codes
            new = _set_codes(dictionary, new, held, dictionary.encode(flat)[:, held], directions[held])
        return new.reshape(current.shape)

    where = parse_site(site)
    return Edit(where, where, keep_bos(edit))


def _set_codes(dictionary: Dictionary, x: torch.Tensor, units: torch.Tensor, values: torch.Tensor,
               directions: torch.Tensor) -> torch.Tensor:
    """x + Σ_j (v_j − a_j(x))·d_j: the codes of `units` set to `values` ([k], or [N, k] per row) through
    the decoder, the reconstruction error kept; `directions` are those units' rows."""
    return x + (values - dictionary.encode(x)[:, units]) @ directions


def ablation_edit(dictionary: Dictionary, site: str, units: list[int], to: list[float] | None = None) -> Edit:
    """Set the codes of `units` together to `to` (default 0) with the reconstruction error kept:
    x + Σ_j (v_j − a_j(x))·d_j."""
    for unit in units:
        check_unit(dictionary, unit)
    device = dictionary.device
    chosen = torch.tensor(list(units), dtype=torch.long, device=device)
    values = torch.tensor([0.0] * len(units) if to is None else to, dtype=torch.float, device=device)
    directions = dictionary.directions.float()[chosen]

    def edit(read: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        flat = current.reshape(-1, current.shape[-1])
        return _set_codes(dictionary, flat, chosen, values, directions).reshape(current.shape)

    where = parse_site(site)
    return Edit(where, where, keep_bos(edit))


def attribution(model, dictionary: Dictionary, site: str, batches: list[tuple],
                to: torch.Tensor | None = None) -> torch.Tensor:
    """Every unit's first-order estimate of the change of next-token loss (mean per token, then over
    contexts, as `measure`'s loss) when its code is set to 0 (or to `to[j]`) at every position but BOS:
        Δloss_j ≈ Σ_t (v_j − a_tj) (d_j · ∂loss/∂x_t)      (attribution patching)
    One forward and one backward pass per batch rank all units; the largest are worth a real ablation."""
    where = parse_site(site)
    total = torch.zeros(dictionary.n_latents, device=dictionary.device)
    n_contexts = sum(ids.shape[0] for ids, _ in batches)
    directions = dictionary.directions.float()
    for ids, mask in batches:
        seen: dict[str, torch.Tensor] = {}

        def keep(read, current, seen=seen):
            seen["x"] = current.detach().float().requires_grad_(True)
            return seen["x"]

        with torch.enable_grad(), SiteEditor(model, [Edit(where, where, keep)]):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            valid = mask[:, 1:].float()
            loss = ((nll * valid).sum(1) / valid.sum(1).clamp_min(1)).sum() / n_contexts
            (grad,) = torch.autograd.grad(loss, seen["x"])
        positions = _edited(mask)
        x, g = seen["x"].detach()[positions], grad[positions]
        target = torch.zeros(dictionary.n_latents, device=total.device) if to is None else to.to(total.device).float()
        total += ((target - dictionary.encode(x)) * (g @ directions.T)).sum(0)
    return total.cpu()


@dataclass(frozen=True)
class Probe:
    """One edit to measure (None: the unedited model), the unit it targets, the unit's logit-lens token
    ids, the downstream units a cross-layer graph links to it (with their r), and its neighbours in the
    within-site graph."""
    edit: Edit | None
    unit: int
    lens_ids: tuple[int, ...] = ()
    linked: tuple[tuple[int, float], ...] = ()
    neighbours: tuple[int, ...] = ()


@torch.no_grad()
def measure(model, dictionary: Dictionary, site: str, batches: list[tuple], edit: Edit | None, unit: int,
            lens_ids: list[int] | None = None, downstream: tuple[Dictionary, str] | None = None,
            linked: list[tuple[int, float]] = ()) -> dict[str, torch.Tensor]:
    """The measures of one edit (see measure_probes)."""
    probe = Probe(edit, unit, tuple(lens_ids or ()), tuple(linked))
    return measure_probes(model, dictionary, site, batches, [probe], downstream)[0]


@torch.no_grad()
def measure_probes(model, dictionary: Dictionary, site: str, batches: list[tuple], probes: list[Probe],
                   downstream: tuple[Dictionary, str] | None = None,
                   progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per probe and per context:
        target      the unit's mean code after the edit minus before
        drift       the mean |change| of the other units' codes at the site
        neighbour_drift   the mean |change| of the codes of the unit's graph neighbours (when given)
        kl          the mean KL(clean ‖ edited) of the next-token distribution per token
        lens        the change of the probability mass on the unit's logit-lens tokens, per token
        loss        the change of the next-token loss
    and with a `downstream` (dictionary, later site):
        downstream_drift    the mean |change| of every downstream unit's code
        downstream_linked   the mean of sign(r)·change over the downstream units linked to the unit
    One clean forward pass per batch serves every probe. Hooks are removed afterwards, also when the
    forward pass fails."""
    from tqdm.auto import tqdm

    sites = [site] + ([downstream[1]] if downstream else [])
    bar = tqdm(total=len(batches) * (len(probes) + 1), desc="steer: forward passes", disable=not progress,
               leave=False)
    capture = ActivationCapture(model, [parse_site(s) for s in sites])
    # the layers before the steered site (and the captured ones) run once per batch
    start = SharedPrefix.first_layer(model, [parse_site(s) for s in sites] +
                                     [s for p in probes if p.edit for s in (p.edit.read, p.edit.write)])
    prefix = SharedPrefix(model, start) if start else None
    rows: list[dict[str, list]] = [{} for _ in probes]
    for ids, mask in batches:
        positions, device = _edited(mask), ids.device
        context = torch.arange(ids.shape[0], device=device).unsqueeze(1).expand_as(positions)[positions]
        counts = torch.bincount(context, minlength=ids.shape[0]).clamp_min(1)
        valid = mask[:, 1:].bool()
        tokens = valid.sum(1).clamp_min(1)
        targets = ids[:, 1:][valid]

        def per_context(values, context=context, counts=counts):
            return torch.zeros(len(counts), device=counts.device).index_add_(0, context, values.float()) / counts

        def per_token(values, valid=valid, tokens=tokens):
            return (values * valid).sum(1) / tokens

        def per_predicted(values, valid=valid):  # [N] over the predicting positions -> [B, T − 1]
            return torch.zeros(valid.shape, device=valid.device).masked_scatter_(valid, values)

        with prefix.recording() if prefix else contextlib.nullcontext():
            clean, hidden = _run(model, capture, sites, ids, mask, valid, None)
        scores = NextTokenScores.clean(model, hidden, targets)
        bar.update()
        codes = [dictionary.encode(clean[site][positions])]
        if downstream:
            codes.append(downstream[0].encode(clean[downstream[1]][positions]))
        for probe, out in zip(probes, rows):
            with prefix.resumed() if prefix else contextlib.nullcontext():
                edited, hidden = _run(model, capture, sites, ids, mask, valid, probe.edit)
            bar.update()
            lens = torch.tensor(probe.lens_ids, device=device) if probe.lens_ids else None  # none: no mass to watch
            nll, kl, *lens_mass = scores.edited(model, hidden, targets, lens)
            if not (torch.isfinite(nll).all() and torch.isfinite(kl).all()):
                raise DictlabError(f"the edit made the model's logits non-finite (unit {probe.unit}); "
                                   "use a smaller value")
            change = dictionary.encode(edited[site][positions]) - codes[0]
            others = torch.ones(dictionary.n_latents, dtype=torch.bool, device=device)
            others[probe.unit] = False
            values = {"target": per_context(change[:, probe.unit]),
                      "drift": per_context(change[:, others].abs().mean(1))}
            if probe.neighbours:
                values["neighbour_drift"] = per_context(change[:, list(probe.neighbours)].abs().mean(1))
            values["kl"] = per_token(per_predicted(kl))
            if lens is not None:
                values["lens"] = per_token(per_predicted(lens_mass[0] - scores.mass(lens)))
            values["loss"] = per_token(per_predicted(nll - scores.nll))
            if downstream:
                below = downstream[0].encode(edited[downstream[1]][positions]) - codes[1]
                values["downstream_drift"] = per_context(below.abs().mean(1))
                if probe.linked:
                    units = torch.tensor([u for u, _ in probe.linked], device=device)
                    signs = torch.tensor([1.0 if r > 0 else -1.0 for _, r in probe.linked], device=device)
                    values["downstream_linked"] = per_context((below[:, units] * signs).mean(1))
            for key, v in values.items():
                out.setdefault(key, []).append(v)
    bar.close()
    return [{k: torch.cat(v).cpu() for k, v in out.items()} for out in rows]


def _edited(mask: torch.Tensor) -> torch.Tensor:
    """The positions an edit touches: every real token but BOS."""
    positions = mask.bool().clone()
    positions[:, 0] = False
    return positions


def _run(model, capture: ActivationCapture, sites: list[str], ids, mask, valid, edit: Edit | None):
    """The sites' activations (after the edit) and the final hidden states at the predicting positions
    of one forward pass (NextTokenScores turns them into the next-token measures)."""
    seen: dict[str, torch.Tensor] = {}
    editor = SiteEditor(model, [edit] if edit is not None else [])
    with editor:
        handles = capture._register(seen, stop_early=False)
        try:
            hidden = final_hidden(model, ids, mask, valid)
        finally:
            for h in handles:
                h.remove()
    return {s: seen[s].float() for s in sites}, hidden


def neighbours(graph_dir, unit: int, most: int = 5) -> list[tuple[int, float]]:
    """The units most correlated with `unit` (largest |r|) and their r, in a graph written by `dictlab graph`:
    either end of a within-site graph's edges, or side B of a cross-site graph (`unit` on side A)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(graph_dir) / "adjacency.safetensors"
    if not path.exists():
        raise DictlabError(f"{graph_dir} holds no adjacency.safetensors: run `dictlab graph` first")
    with safe_open(str(path), "pt") as f:
        a, b = json.loads(f.metadata()["sides"])
        edges = {k: f.get_tensor(k) for k in ("i", "j", "r")}
    touching = edges["i"] == unit
    other = edges["j"][touching]
    if a == b:
        touching = touching | (edges["j"] == unit)
        other = torch.where(edges["i"][touching] == unit, edges["j"][touching], edges["i"][touching])
    r = edges["r"][touching]
    order = r.abs().argsort(descending=True)[:most]
    return list(zip(other[order].tolist(), r[order].tolist()))


def lens_tokens(model, dictionary: Dictionary, units: list[int], k: int = 10) -> dict[int, list[int]]:
    """Each unit's top-k logit-lens token ids (its direction through the final norm and the unembedding)."""
    from dictlab.data.lm import ARCHITECTURES
    from dictlab.interpret.units import logit_lens

    ids = logit_lens(model, dictionary.directions[units].float(), ARCHITECTURES[model.config.model_type].final_norm,
                     k)["top_ids"]
    return {u: row.tolist() for u, row in zip(units, ids)}


def study(model, dictionary: Dictionary, site: str, batches: list[tuple], units: list[int], alphas: list[float],
          held: dict[int, list[int]], lens: dict[int, list[int]] | None = None,
          downstream: tuple[Dictionary, str] | None = None, linked: dict[int, list[tuple[int, float]]] | None = None,
          scales: dict[int, float] | None = None, ablate_to: dict[int, float] | None = None,
          sets: list[list[int]] | None = None, seed: int = 0, progress: bool = False,
          diffmean: dict[int, torch.Tensor] | None = None) -> dict[str, list[dict]]:
    """Steering and ablation of each unit, measured with one clean forward pass per batch.

    steering: for every unit and α, adding α·scales[unit]·d_j (scale 1 by default), plain, corrective
              (holding `held[unit]`), and the controls (steering_controls.py) "random" (a random direction of
              the same norm) and, for the units in `diffmean`, "diffmean" (that direction, the same norm);
              each measure's mean over contexts with a 95% bootstrap interval, as (mean, low, high).
              `held[unit]` are also the neighbours whose drift is measured.
    ablation: each unit set to 0 (or to `ablate_to[unit]`, e.g. its mean code) alone, and each of `sets`
              together, ranked by the change of next-token loss: the causal importance. The `target`
              and drift measures of a set are those of its first unit.
    """
    lens, linked, scales, ablate_to = lens or {}, linked or {}, scales or {}, ablate_to or {}
    steering, probes = [], []
    for unit in units:
        extra = {"lens_ids": tuple(lens.get(unit, ())), "linked": tuple(linked.get(unit, ())),
                 "neighbours": tuple(held.get(unit, ()))}
        for alpha in alphas:
            added = alpha * scales.get(unit, 1.0)
            for mode, hold, edit in steering_modes(dictionary, site, unit, added, held, diffmean, seed):
                steering.append({"unit": unit, "alpha": alpha, "added": added, "mode": mode, "held": list(hold)})
                probes.append(Probe(edit, unit, **extra))
    ablation = []
    for group in [[u] for u in units] + [list(g) for g in sets or ()]:
        values = [ablate_to.get(u, 0.0) for u in group]
        ablation.append({"unit": group[0] if len(group) == 1 else group, "ablated_to": values[0] if len(group) == 1
                         else values})
        probes.append(Probe(ablation_edit(dictionary, site, group, values), group[0],
                            linked=tuple(linked.get(group[0], ())) if len(group) == 1 else (),
                            neighbours=tuple(held.get(group[0], ())) if len(group) == 1 else ()))
    measured = measure_probes(model, dictionary, site, batches, probes, downstream, progress)
    for row, out in zip(steering + ablation, measured):
        row.update({k: bootstrap_mean(v.numpy(), seed=seed) for k, v in out.items()})
    return {"steering": steering, "ablation": sorted(ablation, key=lambda r: -r["loss"][0])}


def steering_modes(dictionary: Dictionary, site: str, unit: int, added: float, held: dict[int, list[int]],
                   diffmean: dict[int, torch.Tensor] | None, seed: int = 0) -> list[tuple[str, list[int], Edit]]:
    """(mode, held units, edit) for one unit pushed by `added`·d_j: plain, corrective (when it has
    neighbours to hold), random, and diffmean (when it has a DiffMean direction)."""
    hold = held.get(unit, [])
    modes = [("plain", [], steering_edit(dictionary, site, unit, alpha=added))]
    if hold:
        modes.append(("corrective", hold, steering_edit(dictionary, site, unit, alpha=added, hold=hold)))
    modes.append(("random", [], random_edit(dictionary, site, unit, added, seed)))
    if diffmean and diffmean.get(unit) is not None:
        modes.append(("diffmean", [], diffmean_edit(dictionary, site, unit, added, diffmean[unit])))
    return modes


@torch.no_grad()
def generate(model, tokenizer, prompt: str, edit: Edit | None, new_tokens: int = 20) -> tuple[str, float]:
    """Greedy continuation of `prompt` under the edit, and its perplexity under the unedited model.
    Without a KV cache: every step re-runs the whole sequence, so the edit sees every position."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model_device(model))
    start = ids.shape[1]
    for _ in range(new_tokens):
        with SiteEditor(model, [edit] if edit is not None else []):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()  # the last only
        if not torch.isfinite(logits).all():
            raise DictlabError("the edit made the model's logits non-finite; use a smaller value")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    log_p = model(input_ids=ids, use_cache=False).logits[:, start - 1:-1].float().log_softmax(-1)
    nll = -log_p.gather(-1, ids[:, start:].unsqueeze(-1)).mean()
    return tokenizer.decode(ids[0, start:]), float(nll.exp())


def steer_dictionary(folder, store, units: list[int], alphas: list[float], graph=None, downstream=None,
                     cross_graph=None, hold: int = 5, contexts: int = 8, prompt: str = "The", new_tokens: int = 20,
                     mean_ablation: bool = False, ablate_sets: list[list[int]] | None = None, verify: int = 5,
                     progress: bool = False, batch_size: Auto = "auto") -> dict:
    """The steering study of one dictionary over the store's first eval contexts, as written to steering.json.

    `alphas` are multiples of each unit's largest code on the eval split: α = 1 adds d_j as strongly as
    the unit's strongest natural activation. `graph`: the dictionary's within-site graph, whose `hold`
    strongest neighbours of each unit corrective steering holds. `downstream`: a dictionary at a later
    site of the same store, whose codes give the downstream drift; `cross_graph` (this dictionary → that
    one) links each unit to the downstream units it moves with. Each unit is also pushed, with the same
    norm, along a random direction and along its DiffMean direction over the eval split
    (steering_controls.py). Generations run at the largest α in every mode, beside the unsteered text.
    Ablation: every unit of the dictionary is ranked by its attribution estimate; the steered units, the
    `verify` with the largest estimates, the steered units together and each of `ablate_sets` together
    are then ablated for real. `batch_size`: contexts
    per forward pass ("auto": 4 on a CPU, what fits on a GPU; `placement.contexts_per_batch`). The model,
    the dictionaries and the contexts stay on the device where this process computes.
    """
    from pathlib import Path

    from dictlab.data import distributed
    from dictlab.data.io import read_json
    from dictlab.dictionaries import load_dictionary
    from dictlab.measures.downstream import eval_context_batches

    folder, device = Path(folder), distributed.device()  # where shared_model puts the model
    config, dictionary = read_json(folder / "config.json"), load_dictionary(folder).on_device(device)
    if config.get("target_site"):
        raise DictlabError(f"{folder} is a transcoder: steering edits one site through its own dictionary")
    for unit in units + [u for group in ablate_sets or () for u in group]:
        check_unit(dictionary, unit)
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise DictlabError(f"alphas must be a non-empty list of finite numbers, got {alphas}")
    site = config["site"]
    below = None
    if downstream is not None:
        down_site = read_json(Path(downstream) / "config.json")["site"]
        if down_site not in store.sites:
            raise DictlabError(f"the downstream dictionary's site {down_site} is not in the store")
        below = (load_dictionary(downstream).on_device(device), down_site)
    means, peaks = code_stats(dictionary, store, site)
    silent = [u for u in units if peaks[u] <= 0]
    if silent:
        raise DictlabError(f"unit(s) {', '.join(map(str, silent))} never fire on the eval split: α is a multiple of "
                           "a unit's largest code there; pick units that fire")
    scales = {u: float(peaks[u]) for u in units}
    diffmean = diffmean_directions(dictionary, to_device(store.batches(site, "eval", 4096), device), units)
    model, tokenizer, batches = eval_context_batches(store, contexts, batch_size, backward=True)
    held = {u: [k for k, _ in neighbours(graph, u, hold)] for u in units} if graph else {}
    linked = {u: neighbours(cross_graph, u, hold) for u in units} if cross_graph else {}
    estimates = attribution(model, dictionary, site, batches, means if mean_ablation else None)
    ranked = [int(u) for u in estimates.argsort(descending=True)]
    top = [u for u in ranked[:verify] if u not in units]
    ablate_to = {u: float(means[u]) for u in range(dictionary.n_latents)} if mean_ablation else None
    out = study(model, dictionary, site, batches, units, alphas, held, lens_tokens(model, dictionary, units), below,
                linked, scales, ablate_to,
                sets=[[u] for u in top] + [units] * (len(units) > 1) + list(ablate_sets or []),
                progress=progress, diffmean=diffmean)
    for row in out["ablation"]:
        if isinstance(row["unit"], int):
            row["estimate"] = float(estimates[row["unit"]])
    out["attribution"] = [{"unit": u, "estimate": float(estimates[u])} for u in ranked[:20]]
    texts, largest = [], max(alphas, key=abs)
    for unit in units:
        for mode, _, edit in steering_modes(dictionary, site, unit, largest * scales[unit], held, diffmean):
            text, perplexity = generate(model, tokenizer, prompt, edit, new_tokens)
            texts.append({"unit": unit, "alpha": largest, "mode": mode, "text": text, "perplexity": perplexity})
    clean, clean_ppl = generate(model, tokenizer, prompt, None, new_tokens)
    return {"dictionary": str(folder), "site": site, "alphas": list(alphas), "unit_max": scales, "held": held,
            "linked": linked, "contexts": sum(len(ids) for ids, _ in batches),
            "downstream": None if below is None else {"dictionary": str(downstream), "site": below[1]},
            "ablation_kind": "mean" if mean_ablation else "zero", **out,
            "generations": {"prompt": prompt, "unsteered": {"text": clean, "perplexity": clean_ppl},
                            "steered": texts}}


def code_stats(dictionary: Dictionary, store, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's mean and largest code over the store's eval split (on the dictionary's device)."""
    total, n = torch.zeros(dictionary.n_latents, device=dictionary.device), 0
    peak = torch.zeros_like(total)
    for x in to_device(store.batches(site, "eval", 4096), dictionary.device):
        codes = dictionary.encode(x.float())
        total += codes.sum(0)
        peak = torch.maximum(peak, codes.max(0).values)
        n += x.shape[0]
    return total / max(n, 1), peak

"""Neuronpedia feature dashboards, in the layout SAEDashboard's Neuronpedia runner writes: files
`batch-0.json`, `batch-1.json`, … of `features_per_batch` features each, every file one object
{model_id, layer, sae_set, features: [...]}. Built from a dictionary's `interpretation.json` (`dictlab
interpret`), so clusters and mixture components export as well as latents (a unit is a unit).

Per feature: feature_index; frac_nonzero (firing frequency); the activation histogram over (0, max] as
freq_hist_data_bar_values (bin centres) and _bar_heights (counts); the logit lens as pos_str/pos_values
(top tokens) and neg_str/neg_values (bottom); activations: the top examples (bin_min −1, bin_max the
unit's maximum, bin_contains −1, as the runner marks its top group) and, for latents, the examples of
each equal interval of (0, max] (bin_min, bin_max, bin_contains = the fraction of firings there), each
with its token strings and the unit's values on them. Fields dictlab does not compute (neuron alignment,
correlated neurons and features, logit histogram, decoder weight distribution) are empty lists.
"""

from __future__ import annotations

from pathlib import Path

from dictlab.data.io import read_json, write_json
from dictlab.errors import DictlabError

INTERPRETATION = "interpretation.json"
EMPTY = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
         "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
         "correlated_features_l1", "correlated_features_pearson", "logits_hist_data_bar_heights",
         "logits_hist_data_bar_values", "decoder_weights_dist")


def write_neuronpedia(dictionary_folder: Path, out: Path, model_id: str | None = None, layer: int | None = None,
                      sae_set: str | None = None, features_per_batch: int = 128) -> list[Path]:
    """Write the batch files into `out` (an existing empty or temporary folder: see formats.export)."""
    path = Path(dictionary_folder) / INTERPRETATION
    if not path.exists():
        raise DictlabError(f"{path} is missing: a Neuronpedia export is built from the units' examples; run "
                           f"`dictlab interpret --store STORE {dictionary_folder}` first")
    if features_per_batch < 1:
        raise DictlabError(f"features_per_batch must be at least 1, got {features_per_batch}")
    interpretation = read_json(path)
    source = interpretation.get("source") or {}
    site = interpretation.get("site", "")
    if layer is None:
        layer = int(site[1:].split(".")[0]) if site[:1] == "L" and site[1:].split(".")[0].isdigit() else 0
    header = {"model_id": model_id or source.get("model") or "", "layer": layer,
              "sae_set": sae_set or Path(dictionary_folder).name}
    context = {"n_prompts_total": source.get("contexts") or 0, "n_tokens_in_prompt": source.get("context_length") or 0,
               "dataset": source.get("corpus") or ""}
    latents = interpretation.get("kind", "latent") == "latent"
    features = [_feature(unit, context, latents) for unit in interpretation["units"]]
    files = []
    for n, start in enumerate(range(0, len(features), features_per_batch)):
        files.append(out / f"batch-{n}.json")
        write_json(files[-1], {**header, "features": features[start:start + features_per_batch]})
    return files


def _feature(unit: dict, context: dict, latents: bool) -> dict:
    peak = unit.get("max") or 0.0
    heights = unit.get("histogram") or []
    width = peak / len(heights) if heights else 0.0
    lens = unit.get("logit_lens") or {"top": [], "bottom": []}
    activations = [_activation(e, -1, peak, -1) for e in unit.get("top", [])]
    intervals = unit.get("samples", [])
    fired = sum(heights)
    if latents and intervals and heights and len(heights) % len(intervals) == 0:  # equal intervals of (0, max]
        per = len(heights) // len(intervals)
        for i, examples in enumerate(intervals):
            share = sum(heights[i * per:(i + 1) * per]) / fired if fired else 0.0
            low, high = peak * i / len(intervals), peak * (i + 1) / len(intervals)
            activations += [_activation(e, round(low, 3), round(high, 3), round(share, 4)) for e in examples]
    else:  # clusters: members drawn uniformly
        activations += [_activation(e, 0, peak, 1) for examples in intervals for e in examples]
    return {"feature_index": unit["unit"], **{name: [] for name in EMPTY},
            "neg_str": [t for t, _ in lens["bottom"]], "neg_values": [round(v, 3) for _, v in lens["bottom"]],
            "pos_str": [t for t, _ in lens["top"]], "pos_values": [round(v, 3) for _, v in lens["top"]],
            "frac_nonzero": unit["frequency"],
            "freq_hist_data_bar_values": [round(width * (i + 0.5), 3) for i in range(len(heights))],
            "freq_hist_data_bar_heights": heights, **context, "activations": activations}


def _activation(example: dict, low: float, high: float, contains: float) -> dict:
    return {"bin_min": low, "bin_max": high, "bin_contains": contains, "tokens": example["tokens"],
            "values": [round(v, 3) for v in example["scores"]]}

"""The interpretation stage of a run, after evaluation:

    DICT/interpretation.json                    every dictionary's units (units.py); reused while the
                                                store, the dictionary and the settings are unchanged
                                                (its cards.html is written by the report: report/cards.py)
    RUN/interpretation.json                     the per-dictionary summaries side by side, the splitting
                                                links across each entry's widths (splitting.py) and the
                                                first-letter absorption of each latent dictionary
                                                (absorption.py), for the report
    (RUN/units.html, one searchable index of every unit, is written by the report: report/units.py)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from dictlab.data.io import atomic_path, config_hash, read_json, write_json
from dictlab.data.store import Store, select_rows
from dictlab.options import Strict


class InterpretConfig(Strict):
    """The interpretation stage of `dictlab run` (after evaluation): unit statistics and interpretability scores."""
    enabled: bool = Field(True, description="interpret every dictionary of the run")
    split: Literal["eval", "train"] = Field("eval", description="store rows the examples come from")
    n_top: int = Field(20, ge=1, description="top examples per unit (most typical members for clusters)")
    per_interval: int = Field(5, ge=0, description="random examples from each fifth of a latent's activation range")
    logit_lens: bool = Field(True, description="top and bottom tokens of each direction through the unembedding")
    coherence: bool = Field(True, description="context coherence z-score (all-MiniLM-L6-v2, the [interpret] "
                            "extra; skipped with a note when missing)")
    splitting: bool = Field(True, description="parent -> children across the widths of each entry")
    absorption: bool = Field(True, description="first-letter absorption rate of each latent dictionary")
    absorption_rows: int = Field(50_000, ge=100, description="rows of the split read for absorption, at most")
    explainer_url: str | None = Field(None, description="OpenAI-compatible endpoint for explanations and "
                                      "detection scores (default: $DICTLAB_EXPLAINER_URL; none: skipped)")
    explainer_model: str = Field("gpt-4o-mini", description="model name sent to the endpoint")
    explain_units: int = Field(50, ge=0, description="explain the first N units that fire, per dictionary")

log = logging.getLogger(__name__)


class Interpreter:
    """What interpreting needs once per store, loaded when first needed: the model (logit lens) and
    tokenizer, the sentence embedder (coherence; its cache is shared by every dictionary), and the
    explainer endpoint."""

    def __init__(self, store: Store, cfg: InterpretConfig):
        from dictlab.data.sentence_model import missing

        self.store, self.cfg, self.notes = store, cfg, []
        absent = missing() if cfg.coherence else None
        if absent:
            self.notes.append(f"coherence skipped: {absent}")
        self.explainer_url = cfg.explainer_url or os.environ.get("DICTLAB_EXPLAINER_URL")
        if not self.explainer_url:
            self.notes.append("explanations skipped: no OpenAI-compatible endpoint configured (explainer_url, "
                              "--explainer-url or DICTLAB_EXPLAINER_URL)")
        self.settings = {**cfg.model_dump(include={"split", "n_top", "per_interval", "logit_lens"}),
                         "coherence": cfg.coherence and not absent, "explainer_url": self.explainer_url,
                         "explainer_model": cfg.explainer_model if self.explainer_url else None,
                         "explain_units": cfg.explain_units if self.explainer_url else None}

    @functools.cached_property
    def model_and_tokenizer(self):
        from transformers import AutoTokenizer

        from dictlab.data.lm import resolve_model, shared_model

        spec = self.store.manifest["spec"]
        if self.cfg.logit_lens:  # the model as extracted (its dtype), shared with the other stages of a run
            return shared_model(spec["model"], self.store.model_dtype)
        return None, AutoTokenizer.from_pretrained(resolve_model(spec["model"]))

    @functools.cached_property
    def embed(self):
        from dictlab.data.sentence_model import sentence_encoder

        return sentence_encoder() if self.settings["coherence"] else None

    def folder(self, folder: Path, progress: bool = False) -> dict:
        """Interpret one dictionary into its interpretation.json (or reuse it)."""
        from dictlab.interpret.units import interpret_dictionary, monosemanticity

        folder = Path(folder)
        inputs = {"store": self.store.identity, "dictionary": config_hash(read_json(folder / "config.json")),
                  "settings": self.settings}
        path = folder / "interpretation.json"
        if path.exists():
            previous = read_json(path)
            if previous.get("inputs") == inputs:
                return previous
        model, tokenizer = self.model_and_tokenizer
        out = interpret_dictionary(self.store, folder, self.cfg.split, n_top=self.cfg.n_top,
                                   per_interval=self.cfg.per_interval, model=model, tokenizer=tokenizer,
                                   embed=self.embed, progress=progress)
        if self.explainer_url:
            from dictlab.interpret.explain import Explainer, explain_units

            firing = [u["unit"] for u in out["units"] if u["top"]][: self.cfg.explain_units]
            explain_units(out, Explainer(self.explainer_url, self.cfg.explainer_model), firing)
            out["summary"] = monosemanticity(out["units"])
        out["inputs"] = inputs
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(out, separators=(",", ":")))
        return out


def width_chains(folders: list[Path]) -> list[list[Path]]:
    """Dictionaries that differ only in width (K, or SAE latents), each chain sorted narrow to wide:
    the same site, method and settings, the same sparsity k or coefficient and seed."""
    groups: dict[str, list] = {}
    for folder in folders:
        inputs = read_json(Path(folder) / "config.json").get("inputs") or {}
        size = inputs.get("size")
        if isinstance(size, int):
            width, rest = size, None
        elif isinstance(size, dict) and "latents" in size:
            width, rest = size["latents"], {k: v for k, v in size.items() if k != "latents"}
        else:  # imported (pretrained) dictionaries
            continue
        settings = {k: v for k, v in inputs["fit"].items() if k not in ("k", "latents", "name")}
        key = json.dumps([inputs["site"], settings, rest], sort_keys=True)
        groups.setdefault(key, []).append((width, str(folder)))
    return [[Path(f) for _, f in sorted(chain)] for chain in groups.values() if len(chain) >= 2]


def _splitting(store: Store, chain: list[Path], split: str, batch_size: int) -> list[dict]:
    from dictlab.dictionaries import load_dictionary
    from dictlab.interpret.splitting import split_tree

    site = read_json(chain[0] / "config.json")["site"]
    links = []
    for narrow, wide in zip(chain, chain[1:]):
        tree = split_tree(load_dictionary(narrow), load_dictionary(wide), store.batches(site, split, batch_size))
        links.append({"site": site, "narrow": str(narrow), "wide": str(wide), "agreement": tree["agreement"],
                      "split_fraction": tree["split_fraction"], "splits": tree["splits"]})
    return links


def _absorption_rows(store: Store, site: str, split: str, max_rows: int, tokenizer, seed: int = 0):
    """A seeded sample of at most `max_rows` rows of the split, as two halves by context (even, odd):
    the probes are trained on one and absorption measured on the other. Each: (activations, letters)."""
    from dictlab.interpret.absorption import first_letters

    n = store.rows(split)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    columns = ("token", "context")
    picked = [b for _, b in select_rows(store.batches(site, split, 4096, columns=columns), rows)]
    x = torch.cat([b["x"].float() for b in picked])
    ids, context = torch.cat([b["token"] for b in picked]), torch.cat([b["context"] for b in picked])
    vocab = {i: tokenizer.decode([i]) for i in set(ids.tolist())}
    halves = []
    for half in (context % 2 == 0, context % 2 == 1):
        halves.append((x[half], first_letters([vocab[i] for i in ids[half].tolist()])))
    return halves


def interpret_run(store: Store, folders: list[Path], cfg: InterpretConfig, out: Path, batch_size: int = 4096,
                  progress: bool = True) -> dict:
    """Interpret every dictionary, then the splitting links and absorption; written to `out`."""
    from dictlab.dictionaries import load_dictionary
    from dictlab.interpret.absorption import absorption, letter_probes

    folders = [Path(f) for f in folders]
    interpreter = Interpreter(store, cfg)
    inputs = {"store": store.identity, "settings": interpreter.settings, "config": cfg.model_dump(),
              "dictionaries": [config_hash(read_json(f / "config.json")) for f in folders]}
    if out.exists():
        previous = read_json(out)
        if previous.get("inputs") == inputs and all((f / "interpretation.json").exists() for f in folders):
            return previous
    for note in interpreter.notes:
        log.warning(note)
    entries = []
    for folder in tqdm(folders, desc="interpret", disable=not progress):
        result = interpreter.folder(folder)
        config = read_json(folder / "config.json")
        entries.append({"dictionary": str(folder), "site": result["site"], "target_site": config.get("target_site"),
                        "kind": result["kind"], "summary": result["summary"],
                        "units": [_index_entry(u) for u in result["units"]]})
    splitting = []
    if cfg.splitting:
        for chain in tqdm(width_chains(folders), desc="splitting", disable=not progress, leave=False):
            splitting += _splitting(store, chain, cfg.split, batch_size)
    if cfg.absorption:
        by_site: dict[str, list[dict]] = {}
        for entry in entries:  # a transcoder's decoder lives in another space than its input: left out
            if entry["kind"] == "latent" and not entry["target_site"]:
                by_site.setdefault(entry["site"], []).append(entry)
        for site, group in by_site.items():
            (x_probe, letters_probe), (x, letters) = _absorption_rows(store, site, cfg.split, cfg.absorption_rows,
                                                                      interpreter.model_and_tokenizer[1])
            probes = letter_probes(x_probe, letters_probe)
            for entry in tqdm(group, desc=f"absorption {site}", disable=not progress, leave=False):
                entry["absorption"] = absorption(load_dictionary(entry["dictionary"]), x, letters, probes=probes)
    result = {"inputs": inputs, "notes": interpreter.notes, "dictionaries": entries, "splitting": splitting}
    write_json(out, result)
    return result


def _index_entry(unit: dict) -> dict:
    """What the run's unit index keeps of a unit: its number, frequency, scores and the tokens it fires on."""
    from dictlab.interpret.units import top_tokens

    return {"unit": unit["unit"], "frequency": unit["frequency"], "tokens": top_tokens(unit),
            **{k: unit.get(k) for k in ("token_entropy", "top_token_share", "coherence", "detection")}}

"""The graph and steering stages of `dictlab run` (after interpretation).

    runs/<name>/graphs/<site>.<folder>/                       within-site graph of one dictionary
    runs/<name>/graphs/<site>.<folder>__<site>.<folder>/      cross graph of two (A's units → B's)
    runs/<name>/steering.json                                 the steering comparison and ablation ranking

Dictionaries are named SITE/FOLDER under runs/<name>/dictionaries. Each output records its inputs (the
store, the dictionaries' configs, the settings) and is reused while they are unchanged; a graph
folder counts as done only once its summary.json, written last, holds those inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from dictlab.data.io import atomic_path, config_hash, read_json
from dictlab.data.store import Store
from dictlab.errors import DictlabError
from dictlab.options import Strict

DICTIONARY_NAME = r"^[^/]+/[^/]+$"


class GraphConfig(Strict):
    """Co-activation graphs in `dictlab run` (after interpretation): graph.py."""
    dictionaries: list[Annotated[str, Field(pattern=DICTIONARY_NAME)]] = Field(
        default_factory=list, description="dictionaries of the run as SITE/FOLDER (e.g. L8.resid_post/"
        "sae-topk-n1024-k32): a within-site graph of each, and a cross graph of each with the next one")
    split: Literal["eval", "train"] = Field("eval", description="store rows to count over")
    min_r: float = Field(0.3, ge=0, lt=1, description="an edge needs |Pearson r| above this")
    min_count: int = Field(5, ge=1, description="and at least this many co-active tokens")
    bins: int = Field(4, ge=1, description="activation bins per unit for the binned mutual information")


class SteerConfig(Strict):
    """The steering comparison in `dictlab run` (after the graphs): steer.py."""
    dictionary: str | None = Field(None, pattern=DICTIONARY_NAME, description="SITE/FOLDER of the dictionary "
                                   "steered (none: no steering); its within-site graph picks the held neighbours")
    downstream: str | None = Field(None, pattern=DICTIONARY_NAME, description="SITE/FOLDER of a dictionary at a "
                                   "later site: downstream drift, and the units linked by the cross graph")
    units: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="units to steer and ablate (default: the n_units with the most edges in "
        "the within-site graph; without edges, the largest mean codes)")
    n_units: int = Field(3, ge=1, description="units picked when `units` is not given")
    alphas: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0], min_length=1,
        description="α as multiples of each unit's largest code on the eval split")
    hold: int = Field(5, ge=1, description="neighbours held by corrective steering (and downstream units linked)")
    contexts: int = Field(8, ge=1, description="eval contexts measured on")
    prompt: str = Field("The", description="prompt of the side-by-side generations (at the largest α)")
    new_tokens: int = Field(20, ge=0, description="tokens generated per prompt")
    mean_ablation: bool = Field(False, description="ablate to the unit's mean code instead of 0")
    verify: int = Field(5, ge=0, description="every unit is ranked by its attribution estimate of the ablation; "
                        "the top N are also ablated for real")
    ablate_sets: list[list[Annotated[int, Field(ge=0)]]] = Field(default_factory=list, description="sets of units "
                                                                 "ablated together")

    @model_validator(mode="after")
    def _needs_dictionary(self):
        if self.downstream and not self.dictionary:
            raise ValueError("steer.downstream needs steer.dictionary")
        return self


def graph_name(a: str, b: str | None = None) -> str:
    """The graphs/ folder of A's within-site graph, or of A's cross graph with B."""
    return "__".join(name.replace("/", ".") for name in (a, b) if name)


def planned_graphs(graph: GraphConfig, steer: SteerConfig) -> list[tuple[str, str | None]]:
    """(A, B or None) for every graph the run needs: the configured ones, plus the steered dictionary's
    within-site graph and its cross graph with the downstream dictionary."""
    wanted = [(d, None) for d in graph.dictionaries]
    wanted += list(zip(graph.dictionaries, graph.dictionaries[1:]))
    if steer.dictionary:
        wanted.append((steer.dictionary, None))
        if steer.downstream:
            wanted.append((steer.dictionary, steer.downstream))
    return list(dict.fromkeys(wanted))


def check_names(graph: GraphConfig, steer: SteerConfig, fitted: dict[str, str | None]) -> None:
    """Every dictionary the graph and steer blocks name must be one the run fits (SITE/FOLDER, mapped to
    the site it reconstructs when that is another: a transcoder, which cannot be steered)."""
    named = list(graph.dictionaries) + [n for n in (steer.dictionary, steer.downstream) if n]
    unknown = list(dict.fromkeys(n for n in named if n not in fitted))
    if unknown:
        raise DictlabError(f"graph/steer name dictionaries the run does not fit: {', '.join(unknown)}; "
                           f"the run fits: {', '.join(fitted)}")
    if steer.dictionary and fitted[steer.dictionary]:
        raise DictlabError(f"steer.dictionary {steer.dictionary} is a transcoder: steering edits one site through "
                           "its own dictionary; name an SAE or clustering model")


def graph_stage(run: Path, store: Store, graph: GraphConfig, steer: SteerConfig, progress: bool = False) -> list[Path]:
    """Build (or reuse) every graph the run needs; returns their folders."""
    from dictlab.analyses.graph import build_graph, write_graph

    graph_folders = []
    for a, b in planned_graphs(graph, steer):
        folders = [run / "dictionaries" / n for n in (a, b) if n]
        for f in folders:
            if not (f / "config.json").exists():
                raise DictlabError(f"{f} holds no fitted dictionary (a pretrained source that could not be loaded?)")
        inputs = {"store": store.identity, "dictionaries": [config_hash(read_json(f / "config.json")) for f in folders],
                  "settings": graph.model_dump(exclude={"dictionaries"})}
        out = run / "graphs" / graph_name(a, b)
        graph_folders.append(out)
        done = out / "summary.json"
        if done.exists() and read_json(done).get("inputs") == inputs:
            continue
        done.unlink(missing_ok=True)  # a half-rewritten folder is never trusted
        result = build_graph(store, folders[0], store, folders[-1] if b else None, graph.split, graph.min_r,
                             graph.min_count, graph.bins, progress=progress)
        result["summary"]["inputs"] = inputs
        write_graph(result, out)
    return graph_folders


def busiest_units(graph_dir: Path, most: int) -> list[int]:
    """The `most` units with the most edges in a within-site graph, most first (ties: lower unit first);
    fewer when fewer units have edges."""
    from safetensors.torch import load_file

    edges = load_file(str(graph_dir / "adjacency.safetensors"))
    degree = np.bincount(np.concatenate([edges["i"].numpy(), edges["j"].numpy()]).astype(np.int64))
    order = np.lexsort((np.arange(len(degree)), -degree))
    return [int(u) for u in order[:most] if degree[u] > 0]


def strongest_units(folder: Path, store: Store, most: int) -> list[int]:
    """The `most` units with the largest mean code on the eval split (for a graph without edges)."""
    from dictlab.analyses.steer import code_stats
    from dictlab.dictionaries import load_dictionary

    dictionary = load_dictionary(folder)
    means, _ = code_stats(dictionary, store, read_json(folder / "config.json")["site"])
    return [int(u) for u in means.argsort(descending=True)[:most] if means[u] > 0]


def steer_stage(run: Path, store: Store, steer: SteerConfig, progress: bool = False) -> dict | None:
    """Write (or reuse) RUN/steering.json: plain vs corrective steering, ablation and generations."""
    from dictlab.analyses.steer import steer_dictionary

    if not steer.dictionary:
        return None
    folders = [run / "dictionaries" / n for n in (steer.dictionary, steer.downstream) if n]
    within = run / "graphs" / graph_name(steer.dictionary)
    cross = run / "graphs" / graph_name(steer.dictionary, steer.downstream) if steer.downstream else None
    graphs = [read_json(g / "summary.json")["inputs"] for g in (within, cross) if g]
    inputs = {"store": store.identity, "dictionaries": [config_hash(read_json(f / "config.json")) for f in folders],
              "graphs": graphs, "settings": steer.model_dump()}
    path = run / "steering.json"
    if path.exists() and read_json(path).get("inputs") == inputs:
        return read_json(path)
    picked = "given"
    units = steer.units
    if units is None:
        picked, units = "most edges in the within-site graph", busiest_units(within, steer.n_units)
    if not units:  # no unit has an edge: nothing to hold, but the plain steering and ablation still say something
        picked, units = "largest mean code (the within-site graph has no edges)", strongest_units(
            folders[0], store, steer.n_units)
    out = steer_dictionary(folders[0], store, units, steer.alphas, within, folders[1] if steer.downstream else None,
                           cross, steer.hold, steer.contexts, steer.prompt, steer.new_tokens, steer.mean_ablation,
                           steer.ablate_sets, steer.verify, progress)
    out["inputs"], out["name"], out["units_picked_by"] = inputs, steer.dictionary, picked
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    return out

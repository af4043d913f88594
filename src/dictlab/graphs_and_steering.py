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

import numpy as np

from dictlab.config import GraphConfig, SteerConfig
from dictlab.errors import DictlabError
from dictlab.io import atomic_path, config_hash, read_json
from dictlab.store import Store


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


def check_names(graph: GraphConfig, steer: SteerConfig, fitted: list[str]) -> None:
    """Every dictionary the graph and steer blocks name must be one the run fits (SITE/FOLDER)."""
    named = list(graph.dictionaries) + [n for n in (steer.dictionary, steer.downstream) if n]
    unknown = list(dict.fromkeys(n for n in named if n not in fitted))
    if unknown:
        raise DictlabError(f"graph/steer name dictionaries the run does not fit: {', '.join(unknown)}; "
                           f"the run fits: {', '.join(fitted)}")
    if steer.dictionary and steer.dictionary.split("/")[1].startswith("transcoder-"):
        raise DictlabError(f"steer.dictionary {steer.dictionary} is a transcoder: steering edits one site through "
                           "its own dictionary; name an SAE or clustering model")


def graph_stage(run: Path, store: Store, graph: GraphConfig, steer: SteerConfig, progress: bool = False) -> list[dict]:
    """Build (or reuse) every graph the run needs; returns their summaries."""
    from dictlab.graph import build_graph, write_graph

    summaries = []
    for a, b in planned_graphs(graph, steer):
        folders = [run / "dictionaries" / n for n in (a, b) if n]
        for f in folders:
            if not (f / "config.json").exists():
                raise DictlabError(f"{f} holds no fitted dictionary (a pretrained source that could not be loaded?)")
        inputs = {"store": store.identity, "dictionaries": [config_hash(read_json(f / "config.json")) for f in folders],
                  "settings": graph.model_dump(exclude={"dictionaries"})}
        out = run / "graphs" / graph_name(a, b)
        done = out / "summary.json"
        if done.exists() and read_json(done).get("inputs") == inputs:
            summaries.append(read_json(done))
            continue
        done.unlink(missing_ok=True)  # a half-rewritten folder is never trusted
        result = build_graph(store, folders[0], store, folders[-1] if b else None, graph.split, graph.min_r,
                             graph.min_count, graph.bins, progress=progress)
        result["summary"]["inputs"] = inputs
        summaries.append({**write_graph(result, out), "name": out.name})
    return summaries


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
    from dictlab.dictionaries import load_dictionary
    from dictlab.steer import code_stats

    dictionary = load_dictionary(folder)
    means, _ = code_stats(dictionary, store, read_json(folder / "config.json")["site"])
    return [int(u) for u in means.argsort(descending=True)[:most] if means[u] > 0]


def steer_stage(run: Path, store: Store, steer: SteerConfig, progress: bool = False) -> dict | None:
    """Write (or reuse) RUN/steering.json: plain vs corrective steering, ablation and generations."""
    from dictlab.steer import steer_dictionary

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

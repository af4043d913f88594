"""The co-activation graph and steering part of the report, from RUN/graphs/*/summary.json and
RUN/steering.json (analyses/stages.py): the graphs side by side with their heatmaps, plain vs
corrective steering with bootstrap intervals, the ablation ranking and the generations; and each
graph's figures (heatmap.png, degree.png), drawn from its graph.json."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from dictlab.data.io import read_json
from dictlab.report.common import fmt, relative
from dictlab.report.plots import pyplot, save_png

# (measure key, header, format) of the steering table, each shown as mean [low, high]
MEASURES = [("target", "target Δcode", "+.3f"), ("neighbour_drift", "neighbour drift", ".4f"),
            ("drift", "drift (other units)", ".4f"),
            ("downstream_drift", "downstream drift", ".4f"), ("downstream_linked", "linked downstream Δ", "+.4f"),
            ("kl", "KL per token", ".4f"), ("lens", "logit-lens Δp", "+.5f"), ("loss", "Δ loss", "+.4f")]


def _interval(value, spec: str) -> str:
    if value is None:
        return "<td>–</td>"
    mean, low, high = value
    return (f"<td data-value='{mean!r}' data-low='{low!r}' data-high='{high!r}'>{fmt(mean, spec)}"
            f"<br><span class='small'>[{fmt(low, spec)}, {fmt(high, spec)}]</span></td>")


def _image(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}' style='max-width: 48%'>"


def _side(side: dict) -> str:
    return f"{side['site']}/{Path(side['dictionary']).name}"


def _configured(run: Path) -> tuple[list[str], bool]:
    """The graph folders the run's config names, and whether it steers: what a rerun with another config
    left behind on disk is not reported."""
    from dictlab.analyses.stages import GraphConfig, SteerConfig, graph_name, planned_graphs

    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    graph, steer = GraphConfig(**config.get("graph", {})), SteerConfig(**config.get("steer", {}))
    return [graph_name(a, b) for a, b in planned_graphs(graph, steer)], steer.dictionary is not None


def graphs_section(run: Path, names: list[str]) -> str:
    folders = [run / "graphs" / name for name in names if (run / "graphs" / name / "summary.json").exists()]
    if not folders:
        return ""
    rows, figures = [], []
    for folder in folders:
        s = read_json(folder / "summary.json")
        a, b = s["sides"]
        within = a == b
        what = _side(a) + ("" if within else f" → {_side(b)}")
        false = s["expected_false_edge_fraction"]
        threshold = s["threshold_for_null_rate"].get("0.01")
        link = html.escape(f"graphs/{folder.name}")
        rows.append(
            f"<tr data-graph='{html.escape(folder.name)}'><td class='text'>{html.escape(what)}</td>"
            f"<td class='text'>{'within' if within else 'across'}</td><td>{s['tokens']}</td>"
            f"<td>{s['co_active_pairs']}</td><td data-key='edges'>{s['edges']}</td><td>{s['null_edges']}</td>"
            f"<td data-key='false'>{fmt(false, '%')}</td><td>{fmt(threshold, '.3f')}</td><td>{s['nodes']}</td>"
            f"<td>{len(s['communities'])}</td><td class='text'>{', '.join(map(str, s['communities'][:5]))}</td>"
            f"<td>{s['max_degree']}</td><td class='text'><a href='{link}/edges.csv'>edges.csv</a> · "
            f"<a href='{link}/graph.graphml'>GraphML</a> · <a href='{link}/graph.json'>JSON</a></td></tr>")
        figures.append(f"<details><summary>{html.escape(what)}: heatmap and degree distribution</summary>"
                       + _image(folder / "heatmap.png", f"heatmap {what}")
                       + _image(folder / "degree.png", f"degrees {what}") + "</details>")
    s0 = read_json(folders[0] / "summary.json")
    return (
        "<h2 id='graphs'>Co-activation graphs</h2>"
        f"<p>Which units fire together over the {s0['tokens']} tokens of the split: within one dictionary (pairs of "
        f"its "
        "units) and across sites or layers (A's units against B's, token by token). An edge needs |Pearson r| above "
        f"{s0['min_r']:g} and at least {s0['min_count']} co-active tokens. The null pairs each token of A with the "
        "token half the split later in B (other documents): its edges are the expected false edges, and the "
        "|r| it exceeds for 1% of its pairs is a calibrated threshold.</p>"
        "<div class='scroll'><table id='graphs-table'><thead><tr><th>dictionaries</th><th>graph</th><th>tokens</th>"
        "<th>co-active pairs</th><th>edges</th><th>null edges</th><th>expected false</th><th>|r| at 1% null</th>"
        "<th>nodes</th><th>communities</th><th>largest</th><th>max degree</th><th>files</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></div>" + "".join(figures))


def steering_section(run: Path) -> str:
    path = run / "steering.json"
    if not path.exists():
        return ""
    s = read_json(path)
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in MEASURES)
    rows = []
    for r in s["steering"]:
        held = ", ".join(map(str, r["held"])) or "–"
        rows.append(f"<tr data-unit='{r['unit']}' data-mode='{r['mode']}'><td>{r['unit']}</td>"
                    f"<td>{r['alpha']:g} ({r['added']:.4g})</td><td class='text'>{r['mode']}</td>"
                    f"<td class='text'>{held}</td>" + "".join(_interval(r.get(k), f) for k, _, f in MEASURES) + "</tr>")
    ablation = "".join(
        f"<tr><td>{rank}</td><td class='text'>{_units(r['unit'])}</td>" + _interval(r["loss"], "+.4f")
        + f"<td>{fmt(r.get('estimate'), '+.4f')}</td>" + _interval(r["kl"], ".4f")
        + _interval(r["drift"], ".4f") + _interval(r.get("downstream_drift"), ".4f") + "</tr>"
        for rank, r in enumerate(s["ablation"], 1))
    ranked = ", ".join(f"{a['unit']} ({a['estimate']:+.4f})" for a in s.get("attribution", []))
    g = s["generations"]
    texts = [_generation("unsteered", "–", g["unsteered"])]
    texts += [_generation(f"unit {t['unit']}", t["mode"], t) for t in g["steered"]]
    down = s.get("downstream")
    return (
        "<h2 id='steering'>Steering and ablation</h2>"
        f"<p>Units of {html.escape(s['name'] if 'name' in s else s['dictionary'])} ({html.escape(s['site'])}) steered "
        f"by "
        "adding α·m<sub>j</sub>·d<sub>j</sub> at every position but BOS, m<sub>j</sub> the unit's largest code on "
        f"the eval split (α = 1: as strong as its strongest natural activation), on {s['contexts']} eval contexts. "
        "<b>Corrective</b> steering holds the unit's most correlated neighbours in the within-site graph at their "
        "unsteered codes; <b>random</b> adds a random direction of the same norm instead (the control); "
        "<b>diffmean</b> adds, with the same norm, the difference between the mean activation on the eval tokens "
        "where the unit is active and where it is not (a supervised baseline direction); "
        "<b>neighbour drift</b> is the neighbours' mean |Δcode|, <b>drift</b> that of all other units. "
        + (f"Downstream: the codes of {html.escape(Path(down['dictionary']).name)} at {html.escape(down['site'])}; "
           "<b>linked</b>: its units the cross graph ties to the steered unit, signed by their r. " if down else "")
        + "Each cell: the mean over contexts and a 95% bootstrap interval.</p>"
        + _units_steered(run, s)
        + "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in steering_highlights(s)) + "</ul>"
        "<div class='scroll'><table id='steering-table'><thead><tr><th>unit</th><th>α (added)</th><th>mode</th>"
        f"<th>held</th>{head}</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
        f"<h3>Ablation ({s['ablation_kind']}), ranked by the change of next-token loss</h3>"
        "<p>Every unit of the dictionary is first ranked by its <b>attribution estimate</b>, the first-order change "
        "of loss Σ<sub>t</sub> (v − a<sub>tj</sub>) d<sub>j</sub>·∂loss/∂x<sub>t</sub> from one backward pass; the "
        "steered units, the highest estimates and the steered units together are then ablated for real. "
        f"Highest estimates: {html.escape(ranked) or '–'}.</p>"
        "<div class='scroll'><table id='ablation-table'><thead><tr><th>rank</th><th>units</th><th>Δ loss</th>"
        "<th>estimate</th><th>KL per token</th><th>drift</th><th>downstream drift</th></tr></thead><tbody>"
        + ablation + "</tbody></table></div>"
        f"<h3>Generations at α = {max(s['alphas'], key=abs):g}</h3><p>Greedy, from "
        f"the prompt <code>{html.escape(g['prompt'])}</code>; perplexity under the unsteered model.</p>"
        "<div class='scroll'><table id='generations-table'><thead><tr><th>steered</th><th>mode</th><th>text</th>"
        "<th>perplexity</th></tr></thead><tbody>" + "".join(texts) + "</tbody></table></div>")


def _units_steered(run: Path, s: dict) -> str:
    """Each steered unit with a link to its card and the tokens it fires on most, from interpretation.json."""
    from dictlab.interpret.units import token_labels

    folder = Path(s["dictionary"])
    units = list(dict.fromkeys(r["unit"] for r in s["steering"]))
    labels = token_labels(folder, 4)
    items = []
    for unit in units:
        tokens = labels.get(unit, "").replace("\n", "⏎")
        items.append(f"<a href='{html.escape(relative(run, str(folder)))}/cards.html#unit={unit}'>unit {unit}</a>"
                     + (f" (fires most on {html.escape(tokens)})" if tokens else ""))
    return "<p id='steering-units'>Units steered: " + "; ".join(items) + ".</p>"


def _units(unit) -> str:
    return str(unit) if isinstance(unit, int) else " + ".join(map(str, unit)) + " (together)"


def _generation(who: str, mode: str, entry: dict) -> str:
    return (f"<tr><td class='text'>{who}</td><td class='text'>{mode}</td><td class='text' style='white-space: "
            f"pre-wrap'>{html.escape(entry['text'])}</td><td>{entry['perplexity']:.2f}</td></tr>")


def steering_highlights(s: dict) -> list[str]:
    """For each unit and α with both modes: how much corrective steering cut the off-target drift and
    what it cost on the target."""
    plain = {(r["unit"], r["alpha"]): r for r in s["steering"] if r["mode"] == "plain"}
    lines = []
    for r in s["steering"]:
        p = plain.get((r["unit"], r["alpha"]))
        if r["mode"] == "random" and p is not None:
            diffmean = next((d for d in s["steering"] if d["mode"] == "diffmean" and d["unit"] == r["unit"]
                             and d["alpha"] == r["alpha"]), None)
            line = (f"unit {r['unit']}, α {r['alpha']:g}: KL per token {p['kl'][0]:.4f} along the unit's "
                    f"direction, {r['kl'][0]:.4f} along a random direction of the same norm")
            if diffmean is not None:
                line += (f", {diffmean['kl'][0]:.4f} along its DiffMean direction (target Δcode "
                         f"{p['target'][0]:+.3f} for the unit's, {diffmean['target'][0]:+.3f} for DiffMean's)")
            lines.append(line + ".")
        if r["mode"] != "corrective" or p is None or not p["drift"][0]:
            continue
        line = f"unit {r['unit']}, α {r['alpha']:g}: holding {len(r['held'])} neighbours changes "
        if "neighbour_drift" in r:
            line += f"their drift {p['neighbour_drift'][0]:.4f} → {r['neighbour_drift'][0]:.4f}, "
        line += (f"the drift of all other units {p['drift'][0]:.4f} → {r['drift'][0]:.4f} "
                 f"({r['drift'][0] / p['drift'][0] - 1:+.0%}), the target Δcode {p['target'][0]:+.3f} → "
                 f"{r['target'][0]:+.3f}")
        if "downstream_drift" in r and p["downstream_drift"][0]:
            line += (f", downstream drift {p['downstream_drift'][0]:.4f} → {r['downstream_drift'][0]:.4f} "
                     f"({r['downstream_drift'][0] / p['downstream_drift'][0] - 1:+.0%})")
        lines.append(line + f", KL {p['kl'][0]:.4f} → {r['kl'][0]:.4f}.")
    if s["ablation"]:
        top = s["ablation"][0]
        lines.append(f"Largest ablation effect: {_units(top['unit'])} (Δ loss {top['loss'][0]:+.4f}).")
    checked = [r for r in s["ablation"] if "estimate" in r]
    if len(checked) > 2:
        import numpy as np

        r = np.corrcoef([c["estimate"] for c in checked], [c["loss"][0] for c in checked])[0, 1]
        lines.append(f"Attribution estimate against the measured Δ loss over the {len(checked)} units ablated alone: "
                     f"Pearson r {r:.2f}.")
    return lines


def section(run: Path) -> str:
    names, steers = _configured(run)
    return graphs_section(run, names) + (steering_section(run) if steers else "")


def draw_graph(folder: Path) -> None:
    """heatmap.png and degree.png of a graph folder (from its graph.json), unless newer than it."""
    import networkx as nx
    import numpy as np

    folder = Path(folder)
    figures = [folder / "heatmap.png", folder / "degree.png"]
    written = (folder / "graph.json").stat().st_mtime_ns
    if all(f.exists() and f.stat().st_mtime_ns >= written for f in figures):
        return
    graph = nx.node_link_graph(read_json(folder / "graph.json"), edges="edges")
    degrees = [d for _, d in graph.degree()]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if degrees:
        ax.hist(degrees, bins=np.unique(np.geomspace(1, max(degrees) + 1, 30).astype(int)), color="#69c")
        ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("degree"), ax.set_ylabel("nodes"), ax.set_title("degree distribution")
    fig.tight_layout()
    save_png(fig, folder / "degree.png")
    _heatmap(graph, folder / "heatmap.png")


def _heatmap(graph, path: Path, most: int = 60) -> None:
    """r among the `most` highest-degree nodes, ordered by average-linkage clustering of 1 − |r|."""
    import numpy as np
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform


    nodes = [n for n, _ in sorted(graph.degree(), key=lambda nd: -nd[1])[:most]]
    r = np.zeros((len(nodes), len(nodes)))
    where = {n: k for k, n in enumerate(nodes)}
    for u, v, data in graph.subgraph(nodes).edges(data=True):
        r[where[u], where[v]] = r[where[v], where[u]] = data["r"]
    np.fill_diagonal(r, 1.0)
    if len(nodes) > 2:
        order = leaves_list(linkage(squareform(1 - np.abs(r), checks=False), "average"))
        r, nodes = r[np.ix_(order, order)], [nodes[k] for k in order]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(r, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(nodes)), nodes, rotation=90, fontsize=5)
    ax.set_yticks(range(len(nodes)), nodes, fontsize=5)
    ax.set_title(f"Pearson r among the {len(nodes)} highest-degree units (0: no edge)")
    fig.colorbar(image)
    fig.tight_layout()
    save_png(fig, path)

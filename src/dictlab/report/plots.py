"""The one plotting helper (matplotlib on the file-only Agg backend, figures as embedded PNG data or files)
and the figures of the run report: Pareto scatters, cluster quality vs K, latent frequencies, training curves."""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from pathlib import Path

from dictlab.data.io import atomic_path, read_json
from dictlab.measures.metrics import FREQ_EDGES
from dictlab.report.common import label, panels, pareto

MARKERS = "os^Dv<>pPXh*"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported late: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_data(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def save_png(fig, path: Path) -> None:
    """Write a figure to a PNG file atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


FAMILY_COLOURS = {"clustering": "tab:blue", "mixtures": "tab:green", "SAEs": "tab:red", "transcoders": "tab:purple",
                  "baselines": "tab:orange"}


def plotted_panels(groups: list[dict], x: str, y: str) -> dict[str, list[dict]]:
    """The panels with at least two groups that have both values: a site with one dictionary is a table
    line, not a plot with one point."""
    shown = {k: [g for g in v if x in g["mean"] and y in g["mean"] and not math.isnan(g["mean"][y])]
             for k, v in panels(groups).items()}
    return {k: v for k, v in shown.items() if len(v) > 1}


def _draw(ax, gs: list[dict], x: str, y: str, xlabel: str, ylabel: str, title: str, log_x: bool,
          higher_y_better: bool) -> None:
    """One panel: a colour per family, a marker per variant (method and decoding: its sizes share it), y
    error bars from the 95% interval over documents (else ±1 std over seeds), x error bars ±1 std over
    seeds, hollow when budget-limited, and the Pareto front dashed."""
    import matplotlib.ticker

    markers: dict[str, str] = {}
    per_family: dict[str, int] = defaultdict(int)
    points = [(g["mean"][x], g["mean"][y]) for g in gs]
    for g, (px, py) in zip(gs, points):
        family = g.get("family") or "other"
        color = FAMILY_COLOURS.get(family, "tab:gray")
        variant = f"{g['method']}{' ' + g['decoding'] if g.get('decoding') else ''} [{family}]"
        if variant not in markers:
            markers[variant] = MARKERS[per_family[family] % len(MARKERS)]
            per_family[family] += 1
            name = variant
        else:
            name = None  # one legend entry per variant
        if y in g["low"]:  # a percentile interval need not contain the full-sample value: clip at the point
            yerr = [[max(py - g["low"][y], 0.0)], [max(g["high"][y] - py, 0.0)]]
        else:
            yerr = g["std"].get(y, 0) or None
        ax.errorbar(px, py, xerr=g["std"].get(x, 0) or None, yerr=yerr, fmt=markers[variant], color=color,
                    capsize=3, label=name, mfc="none" if g.get("budget_limited") else color)
        ax.annotate(_size(g), (px, py), xytext=(4, 2), textcoords="offset points", fontsize=6, color=color)
    front = [points[i] for i in pareto(points, higher_y_better)]
    if len(front) > 1:
        ax.plot(*zip(*front), "k--", lw=1, alpha=0.6, label="Pareto front")
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)


def _size(g: dict) -> str:
    """What tells a variant's points apart: the folder name without its method (k64, n1024-k16, L2-k64)."""
    parts = g["group"].rsplit("/", 2)
    name = parts[1] if len(parts) == 3 else str(int(g["mean"].get("n_latents", 0)))
    return name[len(g["method"]):].lstrip("-") if name.startswith(g["method"]) else name


def headline(groups: list[dict]) -> str | None:
    """The report's first figure: per panel, the FVU–L0 and CE-recovered–L0 fronts side by side."""
    plt = pyplot()
    fvu = plotted_panels(groups, "l0", "fvu")
    if not fvu:
        return None
    ce = plotted_panels(groups, "l0", "ce_recovered_vs_zero")
    fig, axes = plt.subplots(len(fvu), 2, figsize=(15, 5 * len(fvu)), squeeze=False, layout="constrained")
    for row, (name, gs) in zip(axes, fvu.items()):
        _draw(row[0], gs, "l0", "fvu", "L0 (active units per token)", "FVU (lower is better)", f"FVU vs L0 — {name}",
              True, False)
        if name in ce:
            _draw(row[1], ce[name], "l0", "ce_recovered_vs_zero", "L0 (active units per token)",
                  "CE recovered vs zero (higher is better)", f"CE recovered vs L0 — {name}", True, True)
        else:
            row[1].set_axis_off()
    legend = {}
    for ax in axes[:, 0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(legend.values(), legend.keys(), fontsize=7, loc="outside right upper")
    return figure_data(fig)


def scatter(groups: list[dict], x: str, y: str, xlabel: str, ylabel: str, title: str, log_x: bool,
            higher_y_better: bool = False) -> str | None:
    plt = pyplot()
    shown = plotted_panels(groups, x, y)
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(11, 5 * len(shown)), squeeze=False, layout="constrained")
    for ax, (name, gs) in zip(axes[:, 0], shown.items()):
        _draw(ax, gs, x, y, xlabel, ylabel, f"{title} — {name}", log_x, higher_y_better)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_data(fig)


def stability_plot(groups: list[dict]) -> str | None:
    """Cross-seed stability (units matched at cosine ≥ 0.7) against the number of units, per panel, with
    the null of random directions as grey crosses."""
    plt = pyplot()
    shown = plotted_panels(groups, "n_latents", "stability_above_0.7")
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(11, 4.6 * len(shown)), squeeze=False, layout="constrained")
    for ax, (name, gs) in zip(axes[:, 0], shown.items()):
        _draw(ax, gs, "n_latents", "stability_above_0.7", "units", "units matched across seeds at cosine ≥ 0.7",
              f"Cross-seed stability — {name}", True, True)
        ax.scatter([g["mean"]["n_latents"] for g in gs], [g["mean"].get("stability_null_above_0.7") for g in gs],
                   marker="x", color="gray", label="null: random directions")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_data(fig)


def versus_k(groups: list[dict]) -> str | None:
    plt = pyplot()
    by_method: dict[str, list[dict]] = defaultdict(list)
    seen = set()
    for g in groups:
        folder = g["rows"][0]["dictionary"]
        if g.get("unit_kind") == "cluster" and "silhouette" in g["mean"] and folder not in seen:
            seen.add(folder)  # cluster quality does not depend on the decoding: one point per dictionary
            by_method[f"{g['method']} [{g['site']}]"].append(g)
    if not by_method:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for name, gs in by_method.items():
        gs = sorted(gs, key=lambda g: g["mean"]["n_latents"])
        ks = [g["mean"]["n_latents"] for g in gs]
        for ax, key in zip(axes, ("silhouette", "inertia")):
            line = ax.errorbar(ks, [g["mean"][key] for g in gs], yerr=[g["std"][key] for g in gs], marker="o",
                               capsize=3, label=name)
            limited = [(k, g["mean"][key]) for k, g in zip(ks, gs) if g.get("budget_limited")]
            if limited:  # budget-limited fits: hollow markers over the line's
                ax.plot(*zip(*limited), "o", mfc="white", color=line[0].get_color())
    for ax, key in zip(axes, ("silhouette (sample)", "inertia per token (sample)")):
        ax.set(xscale="log", xlabel="K (units)", ylabel=key, title=f"{key} vs K")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_data(fig)


def frequencies(groups: list[dict]) -> str | None:
    plt = pyplot()
    gs = [g for g in groups if g["rows"][0].get("log10_frequency_histogram")]
    if not gs:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.6))
    centers = [(a + b) / 2 for a, b in zip(FREQ_EDGES, FREQ_EDGES[1:])]
    for i, g in enumerate(gs):
        hist = g["rows"][0]["log10_frequency_histogram"]
        total = sum(hist) or 1
        ax.plot(centers, [h / total for h in hist], drawstyle="steps-mid", color=plt.cm.tab20(i % 20),
                ls="-" if i < 20 else "--", label=label(g))
    ax.set(xlabel="log10 firing frequency on the eval split", ylabel="fraction of live units",
           title="Latent frequency histograms (first seed; dead units left out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_data(fig)


def training(run: Path, groups: list[dict]) -> str | None:
    plt = pyplot()
    curves = {"SAE training MSE (scaled inputs)": [], "k-means inertia per training row": [],
              "EM log-likelihood per row": []}
    seen = set()
    for g in groups:
        folder = Path(g["rows"][0]["dictionary"])
        if folder in seen:
            continue
        seen.add(folder)
        meta = read_meta(run, folder)
        if meta is None:
            continue
        cfg, name = meta.get("config", {}), label({**g, "decoding": None})
        if meta.get("training"):
            curves["SAE training MSE (scaled inputs)"].append(
                (name, [p["step"] for p in meta["training"]], [p["mse"] for p in meta["training"]]))
        elif cfg.get("inertia_history") and meta.get("train_rows"):
            h = cfg["inertia_history"]
            curves["k-means inertia per training row"].append(
                (name, list(range(1, len(h) + 1)), [v / meta["train_rows"] for v in h]))
        elif cfg.get("log_likelihood_history"):
            h = cfg["log_likelihood_history"]
            curves["EM log-likelihood per row"].append((name, list(range(1, len(h) + 1)), h))
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = plt.subplots(len(curves), 1, figsize=(11, 4.2 * len(curves)), squeeze=False, layout="constrained")
    for ax, (title, lines) in zip(axes[:, 0], curves.items()):
        for name, xs, ys in lines:
            ax.plot(xs, ys, label=name)
        ax.set(title=title, xlabel="step" if title.startswith("SAE") else "iteration")
        if title.startswith(("SAE", "k-means")):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure_data(fig)


def read_meta(run: Path, folder: Path) -> dict | None:
    for candidate in (folder, run / folder):
        if (candidate / "config.json").exists():
            return read_json(candidate / "config.json")
    return None

"""What every page shares: result rows grouped over seeds, how numbers and labels are written, links
between a report and the folders it shows."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from dictlab.measures.resampling import interval

INTERVAL_KEYS = ("fvu", "ce_recovered_vs_zero", "ce_recovered_vs_mean", "kl_spliced")  # resampled per document


def aggregate(results: list[dict]) -> list[dict]:
    """One entry per group: the numeric fields as mean and std over its seeds, in first-seen order; for
    `INTERVAL_KEYS`, the bootstrap draws of the seed mean (`draws`, one per resample of documents, paired
    across groups) and their 95% interval (`low`, `high`)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r.get("group") or f"{r['site']}/{r['dictionary']}/{r.get('decoding') or '-'}"].append(r)
    out = []
    for key, rows in groups.items():
        first = rows[0]
        g = {"group": key, "rows": rows, "n": len(rows), "mean": {}, "std": {},
             **{k: first.get(k) for k in ("site", "target_site", "method", "decoding", "unit_kind", "family")},
             # a fit that stopped at its budget, not at its stopping rule (any seed)
             "budget_limited": any(r.get("converged") is False for r in rows)}
        for field, value in first.items():
            values = [r.get(field) for r in rows]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None for v in values):
                finite = [float(v) for v in values]
                g["mean"][field] = statistics.fmean(finite)
                g["std"][field] = statistics.stdev(finite) if len(finite) > 1 else 0.0
        g["draws"], g["low"], g["high"] = {}, {}, {}
        for key in INTERVAL_KEYS:
            draws = [r.get("draws", {}).get(key) for r in rows]
            if all(d is not None for d in draws) and len({len(d) for d in draws}) == 1:
                g["draws"][key] = np.mean(np.asarray(draws, dtype=np.float64), axis=0)
                bounds = interval(g["draws"][key])
                if bounds is not None:
                    g["low"][key], g["high"][key] = bounds
        out.append(g)
    return out


def is_sae(g: dict) -> bool:
    """An SAE or transcoder: a learned latent dictionary (not a baseline such as PCA). Results written
    before families were recorded say only their unit kind."""
    family = g.get("family")
    return family in ("SAEs", "transcoders") if family else g.get("unit_kind") == "latent"


BUDGET_MARK = " †"  # after a label: the fit stopped at its budget, before its stopping rule said converged


def label(g: dict) -> str:
    """The dictionary's folder name (without its seed) and decoding: unique within a site; marked † when
    its fit was budget-limited."""
    decoding = f" {g['decoding']}" if g.get("decoding") else ""
    parts = g["group"].rsplit("/", 2)
    name = parts[1] if len(parts) == 3 else f"{g['method']} ({int(g['mean']['n_latents'])})"
    return name + decoding + (BUDGET_MARK if g.get("budget_limited") else "")


def fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if spec == "%":
        return f"{100 * value:.1f}%"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def panels(groups: list[dict]) -> dict[str, list[dict]]:
    """Groups by what they reconstruct: the FVUs of one panel are comparable."""
    panels: dict[str, list[dict]] = defaultdict(list)
    for g in groups:
        panels[g["site"] if not g.get("target_site") else f"{g['site']} → {g['target_site']}"].append(g)
    return panels


def pareto(points: list[tuple[float, float]], higher_y_better: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x; lower y, or higher), by x."""
    sign = -1 if higher_y_better else 1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], math.inf
    for i in order:
        y = sign * points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


def relative(run: Path, folder: str) -> str:
    path = Path(folder)
    try:
        return path.resolve().relative_to(run.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_uri()

"""Paired comparisons between dictionaries of one panel: each clustering or density model against the
SAE nearest to it in L0 and the SAE nearest in parameters (the matched comparison), and each point of the
FVU–L0 Pareto front against the next. A difference is computed on the same resampled documents for both
rows (measures/resampling.py), so its interval is the paired one; it is called significant when its 95%
interval excludes zero (per comparison, not corrected for the number of comparisons)."""

from __future__ import annotations

import html
import math

from dictlab.measures.resampling import paired_difference
from dictlab.report.common import fmt, is_sae, label, panels, pareto

COMPARED = (("fvu", "FVU", ".4f"), ("ce_recovered_vs_zero", "CE rec. (zero)", ".3f"))


def difference(a: dict, b: dict, key: str) -> dict | None:
    """a − b of one metric with its paired 95% interval (None without draws on both sides)."""
    if key not in a["draws"] or key not in b["draws"]:
        return None
    return paired_difference(a["draws"][key], b["draws"][key], a["mean"][key], b["mean"][key])


def _nearest(g: dict, pool: list[dict], key: str) -> dict | None:
    """The group of `pool` nearest to g in log(key) (L0 or parameters: both span decades); among equally
    near ones (SAEs of one width have equal parameters), the nearest in L0."""
    pool = [p for p in pool if p["mean"].get(key, 0) > 0 and p["mean"].get("l0", 0) > 0]
    if not pool or g["mean"].get(key, 0) <= 0 or g["mean"].get("l0", 0) <= 0:
        return None

    def distance(p: dict, k: str) -> float:
        return abs(math.log(p["mean"][k] / g["mean"][k]))

    return min(pool, key=lambda p: (round(distance(p, key), 9), distance(p, "l0")))


def comparisons(groups: list[dict]) -> list[dict]:
    """Every paired comparison of the report: {panel, a, b, matched, differences: {key: difference}}."""
    out = []
    for panel, gs in panels(groups).items():
        saes = [g for g in gs if is_sae(g)]
        for g in (g for g in gs if g.get("unit_kind") == "cluster"):
            by_l0, by_size = _nearest(g, saes, "l0"), _nearest(g, saes, "n_parameters")
            if by_l0 is not None and by_l0 is by_size:
                out.append({"panel": panel, "a": g, "b": by_l0, "matched": "nearest SAE in L0 and in parameters"})
                continue
            for other, matched in ((by_l0, "nearest SAE in L0"), (by_size, "nearest SAE in parameters")):
                if other is not None:
                    out.append({"panel": panel, "a": g, "b": other, "matched": matched})
        front = [gs[i] for i in pareto([(g["mean"]["l0"], g["mean"]["fvu"]) for g in gs])]
        out += [{"panel": panel, "a": a, "b": b, "matched": "next on the FVU–L0 front"}
                for a, b in zip(front, front[1:])]
    for c in out:
        c["differences"] = {key: difference(c["a"], c["b"], key) for key, _, _ in COMPARED}
    return out


def format_difference(d: dict | None, spec: str) -> str:
    """A − B [low, high], * when significant; – without one."""
    if d is None:
        return "–"
    star = " *" if d["significant"] else ""
    return f"{fmt(d['difference'], '+' + spec)} [{fmt(d['low'], '+' + spec)}, {fmt(d['high'], '+' + spec)}]{star}"


def section(groups: list[dict]) -> str:
    """The "Paired comparisons" table."""
    rows = comparisons(groups)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)} A − B [95%]</th>" for _, h, _ in COMPARED)
    out = ["<h2 id='comparisons'>Paired comparisons</h2>",
           "<p class='small'>A − B on the same resampled held-out documents (a paired bootstrap); * marks a 95% "
           "interval that excludes zero, per comparison (not corrected for the number of comparisons). Lower "
           "FVU and higher CE recovered are better. Matched comparisons pair each clustering or density model "
           "with the SAE nearest to it in L0 and with the SAE nearest in parameters.</p>",
           f"<div class='scroll'><table class='sortable' id='comparison-table'><thead><tr><th>panel</th>"
           f"<th>A</th><th>B</th><th>matched on</th><th>L0 A / B</th><th>parameters A / B</th>{head}</tr></thead>"
           "<tbody>"]
    for c in rows:
        a, b = c["a"], c["b"]
        cells = [c["panel"], label(a), label(b), c["matched"],
                 f"{fmt(a['mean']['l0'], '.1f')} / {fmt(b['mean']['l0'], '.1f')}",
                 f"{fmt(a['mean'].get('n_parameters'), '.3g')} / {fmt(b['mean'].get('n_parameters'), '.3g')}"]
        text = "".join(f'<td class="text">{html.escape(v)}</td>' for v in cells)
        for key, _, spec in COMPARED:
            d = c["differences"][key]
            value = f' data-value="{d["difference"]!r}"' if d else ""
            text += f"<td{value}>{html.escape(format_difference(d, spec))}</td>"
        out.append(f"<tr>{text}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def significance_lines(groups: list[dict]) -> list[str]:
    """Summary sentences, per panel and metric: how many paired differences are significant, the
    largest ones, and which comparisons are not distinguishable here."""
    by_panel: dict[str, list[dict]] = {}
    for c in comparisons(groups):
        by_panel.setdefault(c["panel"], []).append(c)
    lines = []
    for panel, cs in by_panel.items():
        for key, name, spec in COMPARED:
            tested = [(c, c["differences"][key]) for c in cs if c["differences"][key] is not None]
            if not tested:
                continue
            significant = [(c, d) for c, d in tested if d["significant"]]
            line = f"[{panel}] {name}: {len(significant)} of {len(tested)} paired differences exclude zero"
            if significant:
                c, d = max(significant, key=lambda cd: abs(cd[1]["difference"]))
                line += (f"; the largest, {label(c['a'])} − {label(c['b'])} ({c['matched']}): "
                         f"{fmt(d['difference'], '+' + spec)} [{fmt(d['low'], '+' + spec)}, "
                         f"{fmt(d['high'], '+' + spec)}]")
            unclear = [f"{label(c['a'])} vs {label(c['b'])}" for c, d in tested if not d["significant"]]
            if unclear:
                line += "; not distinguishable here: " + ", ".join(dict.fromkeys(unclear))
            lines.append(line + ".")
    return lines

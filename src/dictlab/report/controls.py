"""The Controls section of a control run's report (`control: random_weights`, `compare_with: TRAINED`):
every dictionary beside the same entry fitted on the trained model.

Reconstruction (FVU) is compared on the same held-out documents — both stores cut the same corpus the
same way — so trained − random is a paired bootstrap over documents (the draws of both runs). L0 and
dead units are shown as they are. Unit-level interpretability (coherence z, single-token share) comes
from different units on each side, so its difference gets an unpaired bootstrap over units. CE
recovered is shown but labelled: a model that predicts nothing has little loss to recover.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from dictlab.data.io import read_json
from dictlab.measures.resampling import interval
from dictlab.report.common import aggregate, fmt, label
from dictlab.report.comparisons import difference, format_difference


def _interpretation(run: Path) -> dict[str, dict]:
    """Folder name -> its interpretation entry (summary and units), when the run was interpreted."""
    path = run / "interpretation.json"
    if not path.exists():
        return {}
    return {Path(e["dictionary"]).name: e for e in read_json(path)["dictionaries"]}


def _unit_difference(trained: list[float], random: list[float], n: int = 1000, seed: int = 0) -> str:
    """mean(trained) − mean(random) over units with an unpaired bootstrap 95% interval."""
    a, b = (np.asarray([v for v in vs if v is not None], dtype=np.float64) for vs in (trained, random))
    if len(a) < 2 or len(b) < 2:
        return "–"
    rng = np.random.default_rng(seed)
    draws = [a[rng.integers(0, len(a), len(a))].mean() - b[rng.integers(0, len(b), len(b))].mean() for _ in range(n)]
    low, high = interval(draws)
    return f"{a.mean() - b.mean():+.2f} [{low:+.2f}, {high:+.2f}]"


def section(run: Path, config: dict) -> str:
    trained_run = run.parent / config["compare_with"]
    head = "<h2 id='controls'>Controls: trained vs random weights</h2>"
    if not (trained_run / "results.json").exists():
        return (head + f"<p>The trained run {html.escape(str(trained_run))} has no results.json yet: run it "
                "(the same config without <code>control</code>), then <code>dictlab report</code> this run.</p>")
    trained = {g["group"]: g for g in aggregate(read_json(trained_run / "results.json")["results"])}
    control = [g for g in aggregate(read_json(run / "results.json")["results"]) if g["group"] in trained]
    same_text = all(read_json(trained_run / "config.json").get(k) == config.get(k) for k in ("corpus", "extract"))
    units_t, units_r = _interpretation(trained_run), _interpretation(run)
    rows = []
    for g in control:
        t = trained[g["group"]]
        paired = difference(t, g, "fvu") if same_text else None
        diff = format_difference(paired, ".4f")
        name = Path(g["rows"][0]["dictionary"]).name
        it, ir = units_t.get(Path(t["rows"][0]["dictionary"]).name), units_r.get(name)
        def both(key: str, spec: str) -> str:
            return f"{fmt(t['mean'].get(key), spec)} / {fmt(g['mean'].get(key), spec)}"

        cells = [label(g), fmt(t["mean"].get("fvu"), ".4f"), fmt(g["mean"].get("fvu"), ".4f"), diff,
                 both("l0", ".1f"), both("dead_fraction", "%"), both("ce_recovered_vs_zero", ".3f")]
        for key, per_unit, spec in (("median_coherence", "coherence", ".2f"),
                                    ("single_token_fraction", "top_token_share", "%")):
            if it and ir:
                cells.append(f"{fmt(it['summary'].get(key), spec)} / {fmt(ir['summary'].get(key), spec)}")
                cells.append(_unit_difference([u.get(per_unit) for u in it["units"]],
                                              [u.get(per_unit) for u in ir["units"]]))
            else:
                cells += ["–", "–"]
        for key, spec in (("median_token_entropy", ".2f"), ("mean_detection", ".3f")):
            cells.append(f"{fmt(it['summary'].get(key), spec)} / {fmt(ir['summary'].get(key), spec)}"
                         if it and ir else "–")
        rows.append("<tr>" + "".join(f"<td class='text'>{html.escape(c)}</td>" for c in cells) + "</tr>")
    note = ("" if same_text else "<p class='small'>The two runs' corpus or extract settings differ: their held-out "
            "documents are not the same, so no paired difference is shown.</p>")
    return (head + "<p>Every dictionary of this run (the model's architecture with weights drawn afresh by its own "
            "initialisation) beside the same entry fitted on the trained model, run "
            f"<code>{html.escape(config['compare_with'])}</code>. FVU trained − random is paired over the same "
            "held-out documents (* : its 95% interval excludes zero); coherence and top-token share are per-unit "
            "means with an unpaired bootstrap over units. <b>CE recovered means little here</b>: a model with "
            "random weights predicts almost nothing, so there is little loss to recover; lead with FVU, dead "
            "units and the unit-level scores.</p>" + note
            + "<div class='scroll'><table class='sortable' id='controls-table'><thead><tr><th>dictionary</th>"
            "<th>FVU trained</th><th>FVU random</th><th>trained − random [95%]</th><th>L0 trained / random</th>"
            "<th>dead trained / random</th><th>CE rec. trained / random (little meaning)</th>"
            "<th>median coherence z trained / random</th><th>mean coherence trained − random [95%]</th>"
            "<th>single-token trained / random</th><th>mean top-token share trained − random [95%]</th>"
            "<th>median token entropy trained / random</th><th>detection trained / random (with an explainer)</th>"
            "</tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table></div>")

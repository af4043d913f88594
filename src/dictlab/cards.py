"""Unit cards: one self-contained HTML page per dictionary, built from its interpretation.json.

The page embeds the interpretation as JSON and renders with a few lines of JavaScript: a searchable,
sortable index of the units (frequency, maximum, token entropy, the tokens it fires on most), and a
card for the selected unit: its activation histogram, the logit lens, and its example contexts with
each token shaded by the unit's score. Nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from dictlab.io import atomic_path

PAGE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>units of __TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
#layout { display: flex; gap: 1.5em; }
#index { width: 34em; max-height: 85vh; overflow-y: auto; font-size: 12px; }
#index table { border-collapse: collapse; width: 100%; }
#index td, #index th { border-bottom: 1px solid #eee; padding: 2px 4px; text-align: right; cursor: pointer; }
#index td.text { text-align: left; }
#index tr.selected { background: #e8f0ff; }
#card { flex: 1; }
.example { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; margin: 2px 0;
           border-bottom: 1px solid #f2f2f2; }
.tok { border-radius: 2px; }
.target { outline: 1px solid #c33; }
.bar { display: inline-block; width: 14px; background: #69c; margin-right: 1px; vertical-align: bottom; }
.small { font-size: 11px; color: #555; }
</style></head><body>
<h1>Units of __TITLE__</h1>
<p class="small">__SUBTITLE__</p>
<input id="search" placeholder="search tokens or unit number" size="40">
<div id="layout"><div id="index"></div><div id="card"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const esc = s => s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const shown = t => esc(t).replace(/\\n/g, "⏎");
function topTokens(u) {
  const n = {};
  for (const e of u.top) { const t = e.tokens[e.target]; n[t] = (n[t] || 0) + 1; }
  return Object.entries(n).sort((a, b) => b[1] - a[1]).slice(0, 4).map(x => x[0]);
}
function example(e, peak) {
  const toks = e.tokens.map((t, i) => {
    const a = Math.max(0, Math.min(1, (e.scores[i] || 0) / (peak || 1)));
    const cls = i === e.target ? "tok target" : "tok";
    const style = `background: rgba(255,140,0,${a.toFixed(2)})`;
    return `<span class="${cls}" style="${style}" title="${e.scores[i]}">${shown(t)}</span>`;
  }).join("");
  return `<div class="example">${toks}</div>`;
}
function card(u) {
  const peak = Math.max(...u.top.map(e => e.scores[e.target]), 1e-9);
  const hist = Math.max(...u.histogram, 1);
  const bars = u.histogram.map(h =>
    `<span class="bar" style="height:${(40 * h / hist).toFixed(0)}px" title="${h}"></span>`).join("");
  const lens = u.logit_lens ? `<p><b>logit lens</b> top: ${u.logit_lens.top.map(t => esc(t[0])).join(" · ")}<br>
    bottom: ${u.logit_lens.bottom.map(t => esc(t[0])).join(" · ")}</p>` : "";
  const samples = u.samples.map((slot, i) => slot.length ? `<h4>${data.kind === "cluster" ? "random members" :
    `activations in (${(i / u.samples.length).toFixed(1)}, ${((i + 1) / u.samples.length).toFixed(1)}] × max`}</h4>` +
    slot.map(e => example(e, peak)).join("") : "").join("");
  document.getElementById("card").innerHTML = `<h2>unit ${u.unit}</h2>
    <p>frequency ${(100 * u.frequency).toFixed(3)}% · max ${u.max === null ? "–" : u.max.toFixed(4)} · token entropy
    ${u.token_entropy === null ? "–" : u.token_entropy.toFixed(3)} nats · coherence z
    ${u.coherence === undefined || u.coherence === null ? "–" : u.coherence.toFixed(2)}</p>
    ${u.explanation ? `<p><b>explanation</b>: ${esc(u.explanation)} (detection balanced accuracy
    ${u.detection === null || u.detection === undefined ? "–" : u.detection.toFixed(2)})</p>` : ""}
    <div title="activation histogram, 10 bins of (0, max]">${bars}</div>${lens}
    <h3>${data.kind === "cluster" ? "most typical members" : "top activations"}</h3>
    ${u.top.map(e => example(e, peak)).join("")}${samples}`;
  document.querySelectorAll("#index tr").forEach(tr => tr.classList.toggle("selected", tr.dataset.unit == u.unit));
}
function index() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  const rows = data.units.filter(u => !q || String(u.unit) === q ||
    topTokens(u).some(t => t.toLowerCase().includes(q)));
  document.getElementById("index").innerHTML = `<table><thead><tr><th>unit</th><th>freq.</th><th>entropy</th>
    <th class="text">fires on</th></tr></thead><tbody>` + rows.map(u => `<tr data-unit="${u.unit}">
    <td>${u.unit}</td><td>${(100 * u.frequency).toFixed(2)}%</td>
    <td>${u.token_entropy === null ? "–" : u.token_entropy.toFixed(2)}</td>
    <td class="text">${topTokens(u).map(shown).join(" · ")}</td></tr>`).join("") + "</tbody></table>";
  document.querySelectorAll("#index tr[data-unit]").forEach(tr =>
    tr.addEventListener("click", () => card(data.units[Number(tr.dataset.unit)])));
}
document.getElementById("search").addEventListener("input", index);
index();
const first = data.units.find(u => u.top.length);
if (first) card(first);
</script></body></html>
"""


def write_cards(interpretation: dict, path: Path) -> Path:
    """One dictionary's unit cards page (self-contained)."""
    name = Path(interpretation["dictionary"]).name
    subtitle = (f"{interpretation['site']} · {interpretation['kind']}s · {interpretation['n_rows']} rows of the "
                f"{interpretation['split']} split · {interpretation['summary']['units_firing']} of "
                f"{interpretation['summary']['units']} units fire")
    # inside <script>, only "</" could end the element early
    data = json.dumps(interpretation, separators=(",", ":")).replace("</", "<\\/")
    page = (PAGE.replace("__TITLE__", html.escape(name)).replace("__SUBTITLE__", html.escape(subtitle))
            .replace("__DATA__", data))
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path

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

from dictlab.data.io import atomic_path, read_json

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
let current = null;
function card(u) {
  current = u.unit;
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
    tr.addEventListener("click", () => {
      card(data.units[Number(tr.dataset.unit)]);
      location.hash = "unit=" + tr.dataset.unit;
    }));
}
function fromHash() {  // cards.html#unit=N opens unit N (the run's unit index links here)
  const m = location.hash.match(/unit=(\\d+)/);
  return m && data.units[Number(m[1])];
}
document.getElementById("search").addEventListener("input", index);
window.addEventListener("hashchange", () => {  // the card is re-rendered only for another unit
  const u = fromHash();
  if (u && u.unit !== current) card(u);
});
index();
const first = fromHash() || data.units.find(u => u.top.length);
if (first) card(first);
</script></body></html>
"""


def write_cards(interpretation: dict, path: Path) -> Path:
    """One dictionary's unit cards page (self-contained)."""
    name = Path(interpretation["dictionary"]).name
    subtitle = (f"{interpretation['site']} · {interpretation['kind']}s · {interpretation['n_rows']} rows of the "
                f"{interpretation['split']} split · {interpretation['summary']['units_firing']} of "
                f"{interpretation['summary']['units']} units fire")
    return _write_page(PAGE.replace("__SUBTITLE__", html.escape(subtitle)), name, interpretation, path)


def write_dictionary_cards(folder: Path) -> Path:
    """FOLDER/cards.html from FOLDER/interpretation.json, unless it is already newer than it."""
    folder = Path(folder)
    source, page = folder / "interpretation.json", folder / "cards.html"
    if not page.exists() or page.stat().st_mtime_ns < source.stat().st_mtime_ns:
        write_cards(read_json(source), page)
    return page


def _write_page(template: str, title: str, data, path: Path) -> Path:
    # inside <script>, only "</" could end the element early
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = template.replace("__TITLE__", html.escape(title)).replace("__DATA__", text)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


INDEX = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>units of __TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border-bottom: 1px solid #eee; padding: 2px 6px; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
td.text { text-align: left; font-family: ui-monospace, monospace; }
.small { font-size: 11px; color: #555; }
</style></head><body>
<h1>Every unit of __TITLE__</h1>
<p class="small">One row per unit (cluster or latent) of every dictionary of the run. Search the tokens a unit fires on
(its top examples' activating tokens) or a dictionary's name; click a column to sort; a unit opens its card.</p>
<input id="search" placeholder="token or dictionary" size="40">
<select id="dictionary"><option value="">all dictionaries</option></select>
<span id="count" class="small"></span>
<table><thead><tr><th data-key="d">dictionary</th><th data-key="unit">unit</th><th data-key="frequency">freq.</th>
<th data-key="token_entropy">token entropy</th><th data-key="top_token_share">top-token share</th>
<th data-key="coherence">coherence z</th><th data-key="detection">detection</th><th>fires on</th></tr></thead>
<tbody id="rows"></tbody></table>
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const shown = t => esc(t).replace(/\\n/g, "⏎");
const all = data.flatMap((d, i) => d.units.map(u => ({...u, d: d.name, i})));
const select = document.getElementById("dictionary");
data.forEach((d, i) => select.insertAdjacentHTML("beforeend", `<option value="${i}">${esc(d.name)}</option>`));
let sortKey = "frequency", descending = true;
const num = (v, digits) => v === null || v === undefined ? "–" : v.toFixed(digits);
function render() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  const only = select.value;
  let rows = all.filter(u => (only === "" || u.i === Number(only)) &&
    (!q || u.d.toLowerCase().includes(q) || u.tokens.some(t => t.toLowerCase().includes(q))));
  const key = u => u[sortKey] === null || u[sortKey] === undefined ? -Infinity : u[sortKey];
  rows.sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * (descending ? -1 : 1));
  document.getElementById("count").textContent =
    `${rows.length} units` + (rows.length > 1000 ? ", first 1000 shown" : "");
  document.getElementById("rows").innerHTML =
    rows.slice(0, 1000).map(u => `<tr data-dictionary="${u.i}" data-unit="${u.unit}">
    <td class="text"><a href="${esc(data[u.i].cards)}">${esc(u.d)}</a></td>
    <td><a href="${esc(data[u.i].cards)}#unit=${u.unit}">${u.unit}</a></td><td>${(100 * u.frequency).toFixed(3)}%</td>
    <td>${num(u.token_entropy, 2)}</td><td>${num(u.top_token_share, 2)}</td><td>${num(u.coherence, 2)}</td>
    <td>${num(u.detection, 2)}</td><td class="text">${u.tokens.map(shown).join(" · ")}</td></tr>`).join("");
}
document.querySelectorAll("th[data-key]").forEach(th => th.addEventListener("click", () => {
  descending = sortKey === th.dataset.key ? !descending : true;
  sortKey = th.dataset.key;
  render();
}));
document.getElementById("search").addEventListener("input", render);
select.addEventListener("change", render);
render();
</script></body></html>
"""


def write_unit_index(name: str, dictionaries: list[dict], path: Path) -> Path:
    """The run's searchable index of every unit; `dictionaries`: [{name, cards (link), units}], units as
    kept by interpret_run (number, frequency, scores, the tokens it fires on)."""
    return _write_page(INDEX, name, dictionaries, path)

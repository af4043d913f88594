"""`dictlab report RUN_DIR`: one self-contained HTML file (plots embedded as PNG data, no network),
plus results.csv beside results.json.

Rows of results.json that differ only in their seed (folders ending in -s<seed>) form one group,
reported as mean ± std (std over seeds, n − 1 in the denominator) with error bars in every plot.
Every table cell carries its full-precision value in `data-value` and its source folders and seeds
in the row, so each number can be traced to the dictionary's config.json.
"""

from __future__ import annotations

import csv
import html
import math
from datetime import datetime, timezone
from pathlib import Path

from dictlab import __version__
from dictlab.data.io import atomic_path, read_json
from dictlab.errors import DictlabError
from dictlab.report.common import BUDGET_MARK, aggregate, fmt, is_sae, label, panels, pareto, relative
from dictlab.report.comparisons import section as comparisons_section
from dictlab.report.comparisons import significance_lines
from dictlab.report.controls import section as controls_section
from dictlab.report.graphs_and_steering import section as graphs_and_steering
from dictlab.report.plots import (
    frequencies,
    headline,
    plotted_panels,
    scatter,
    stability_plot,
    training,
    versus_k,
)
from dictlab.report.units import section as interpretability
from dictlab.report.units import write_unit_index_page

# (key, header, format) of the two tables; fmt: a format spec, or "%" for a fraction shown in percent
RECONSTRUCTION = [
    ("n_latents", "units", "d"), ("l0", "L0", ".2f"), ("target_l0", "trained k", ".0f"), ("fvu", "FVU", ".4f"),
    ("explained_variance", "EV", ".4f"),
    ("mse", "MSE", ".4g"), ("cosine", "cos", ".4f"), ("relative_norm", "rel. norm", ".3f"), ("l1", "L1", ".3g"),
    ("ce_recovered_vs_zero", "CE rec. (zero)", ".3f"), ("ce_recovered_vs_mean", "CE rec. (mean)", ".3f"),
    ("kl_spliced", "KL", ".4f"), ("ce_spliced", "CE spliced", ".4f"),
    ("dead_fraction", "dead", "%"), ("dense_fraction", "dense", "%"),
]
CLUSTERS_AND_COST = [
    ("n_latents", "units", "d"), ("silhouette", "silhouette", ".4f"), ("calinski_harabasz", "Calinski–Harabasz", ".5g"),
    ("davies_bouldin", "Davies–Bouldin", ".4f"), ("inertia", "inertia/token", ".5g"),
    ("cluster_entropy", "size entropy (nats)", ".3f"), ("clusters_used", "clusters used", ".0f"),
    ("loglik_per_token", "loglik/token", ".6g"), ("bic", "BIC", ".6g"),
    ("epochs", "epochs", ".3g"), ("tokens_seen", "rows seen", ".3g"), ("final_relative_change", "last change", ".2g"),
    ("fit_seconds", "fit s", ".1f"), ("fit_peak_rss_mb", "fit peak RSS MB", ".0f"),
    ("n_parameters", "parameters", ".0f"), ("fit_flops", "fit FLOPs", ".3g"),
    ("encode_flops", "encode FLOPs/token", ".3g"),
    ("stability_above_0.7", "units matched across seeds (cos ≥ 0.7)", "%"), ("stability_above_0.9", "(cos ≥ 0.9)", "%"),
    ("stability_mean_cosine", "mean matched cos", ".3f"), ("stability_null_above_0.7", "null (cos ≥ 0.7)", "%"),
    ("bytes_on_disk", "bytes on disk", ".0f"),
    ("encode_tokens_per_s", "encode tokens/s", ".0f"),
]
CSV_SKIP = {"l0_histogram", "log10_frequency_histogram", "draws"}


# --- the written summary -------------------------------------------------------------------------
def summary(groups: list[dict]) -> list[str]:
    """Sentences that say which method wins where, quoting the numbers (comparable rows only)."""
    lines = []
    for panel, gs in panels(groups).items():
        def best(key, pool, high=False):
            pool = [g for g in pool if key in g["mean"] and not math.isnan(g["mean"][key])]
            return (max if high else min)(pool, key=lambda g: g["mean"][key]) if pool else None

        def q(g, key, spec=".4f"):
            s = fmt(g["mean"][key], spec)
            if key in g["low"]:
                s += f" [{fmt(g['low'][key], spec)}, {fmt(g['high'][key], spec)}]"
            return s + (f" ± {fmt(g['std'][key], spec)} (seeds)" if g["n"] > 1 else "")

        top = best("fvu", gs)
        lines.append(f"[{panel}] Lowest FVU: {label(top)}, FVU {q(top, 'fvu')} at L0 {q(top, 'l0', '.1f')}.")
        one = [g for g in gs if g["mean"].get("l0", 0) <= 1.0 + 1e-9]
        saes = [g for g in gs if is_sae(g)]
        if one:
            b1 = best("fvu", one)
            line = f"[{panel}] With one active unit per token (L0 = 1), {label(b1)} reaches FVU {q(b1, 'fvu')}"
            if saes:
                bs = best("fvu", saes)
                line += f"; the best SAE ({label(bs)}) reaches {q(bs, 'fvu')} with L0 {q(bs, 'l0', '.1f')}"
            lines.append(line + ".")
        ce = best("ce_recovered_vs_zero", gs, high=True)
        if ce is not None:
            line = (f"[{panel}] Most CE loss recovered (against zero ablation): {label(ce)}, "
                    f"{q(ce, 'ce_recovered_vs_zero', '.3f')} (KL {q(ce, 'kl_spliced')})")
            clusters = [g for g in gs if g.get("unit_kind") == "cluster"]
            bc = best("ce_recovered_vs_zero", clusters, high=True)
            if bc is not None and bc is not ce:
                line += (f"; the best clustering or density model, {label(bc)}, recovers "
                         f"{q(bc, 'ce_recovered_vs_zero', '.3f')}")
            lines.append(line + ".")
        front = [gs[i] for i in pareto([(g["mean"]["l0"], g["mean"]["fvu"]) for g in gs])]
        points = (f"{label(g)} (L0 {fmt(g['mean']['l0'], '.1f')}, FVU {fmt(g['mean']['fvu'], '.4f')})"
                  for g in front)
        lines.append(f"[{panel}] On the FVU–L0 Pareto front: " + ", ".join(points) + ".")
        sil = best("silhouette", gs, high=True)
        if sil is not None:
            lines.append(f"[{panel}] Best-separated clusters: {label(sil)}, silhouette {q(sil, 'silhouette')}.")
        fast = best("fit_seconds", gs)
        if fast is not None:
            lines.append(f"[{panel}] Cheapest to fit: {label(fast)}, {q(fast, 'fit_seconds', '.1f')} s "
                         f"(FVU {q(fast, 'fvu')}).")
    return lines


# --- HTML ----------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
.scroll { overflow: auto; max-height: 75vh; margin: 1em 0; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f0f0f0; position: sticky; top: 0; z-index: 1; }
table.sortable th { cursor: pointer; }
table.sortable th[aria-sort=ascending]::after { content: " ▲"; }
table.sortable th[aria-sort=descending]::after { content: " ▼"; }
td.text { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code, pre { background: #f6f6f6; }
.small { font-size: 11px; color: #555; }
"""


def _table(groups: list[dict], columns: list, run: Path, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    out = [f'<div class="scroll"><table class="sortable" id="{table_id}"><thead><tr><th>site</th><th>method</th>'
           f"<th>decoding</th><th>seeds</th>{head}<th>source (folder, seed)</th></tr></thead><tbody>"]
    for g in groups:
        cells = []
        for key, _, spec in columns:
            if key not in g["mean"]:
                cells.append(f'<td data-key="{key}">–</td>')
                continue
            mean, std = g["mean"][key], g["std"][key]
            text = fmt(mean, spec) + (f" ± {fmt(std, spec)}" if g["n"] > 1 else "")
            bounds = ""
            if key in g["low"]:  # the 95% interval over held-out documents
                low, high = g["low"][key], g["high"][key]
                text += f" [{fmt(low, spec)}, {fmt(high, spec)}]"
                bounds = f' data-low="{low!r}" data-high="{high!r}"'
            cells.append(f'<td data-key="{key}" data-value="{mean!r}" data-std="{std!r}"{bounds}>'
                         f'{html.escape(text)}</td>')
        sources = "<br>".join(
            f'<a href="{html.escape(relative(run, r["dictionary"]))}/config.json">'
            f'{html.escape(Path(r["dictionary"]).name)}</a> (seed {r.get("seed")})' for r in g["rows"])
        site = g["site"] + (f" → {g['target_site']}" if g.get("target_site") else "")
        method = g["method"] + (BUDGET_MARK if g.get("budget_limited") else "")
        text = "".join(f'<td class="text">{html.escape(v)}</td>' for v in (site, method, g["decoding"] or "–"))
        out.append(f'<tr data-group="{html.escape(g["group"])}">{text}<td>{g["n"]}</td>{"".join(cells)}'
                   f'<td class="text small">{sources}</td></tr>')
    out.append("</tbody></table></div>")
    if any(g.get("budget_limited") for g in groups):
        out.append(f"<p class='small'>{BUDGET_MARK.strip()} budget-limited: the fit stopped at its budget (SAE "
                   "<code>max_tokens</code>, Lloyd/EM <code>max_iter</code>) before its stopping rule said it had "
                   "converged; hollow markers in the plots. It may be under-trained rather than worse.</p>")
    return "".join(out)


# Click a header of a sortable table: its rows sort by that column (numbers by data-value, else text);
# a second click reverses. Cells without a value go last either way.
SORT_SCRIPT = """
<script>
document.querySelectorAll("table.sortable").forEach(table => {
  table.querySelectorAll("thead th").forEach((th, column) => th.addEventListener("click", () => {
    const descending = th.getAttribute("aria-sort") === "ascending";
    table.querySelectorAll("thead th").forEach(other => other.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    const key = row => {
      const cell = row.children[column];
      if (!cell) return null;
      if (cell.dataset.value !== undefined) return Number(cell.dataset.value);
      const text = cell.textContent.trim();
      return text === "–" ? null : text;
    };
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return descending ? -order : order;
    });
    rows.forEach(row => body.appendChild(row));
  }));
});
</script>
"""

DEFINITIONS = """
<h2 id="definitions">Metric definitions</h2>
<p>All on the store's eval split (documents never seen in fitting). N rows of width d; x̂ the decoding
(for a transcoder, the reconstruction of its target site); a<sub>t</sub> the codes.</p>
<ul>
<li><b>MSE</b> = Σ<sub>t</sub>‖x<sub>t</sub> − x̂<sub>t</sub>‖² / (N·d), per element.</li>
<li><b>FVU</b> = Σ<sub>t</sub>‖x<sub>t</sub> − x̂<sub>t</sub>‖² / Σ<sub>t</sub>‖x<sub>t</sub> − x̄‖², x̄ the eval mean;
  <b>EV</b> = 1 − FVU.</li>
<li><b>cos</b> = mean<sub>t</sub> cos(x<sub>t</sub>, x̂<sub>t</sub>); <b>rel. norm</b> γ = Σ‖x̂‖² / Σ x·x̂ (γ &lt; 1:
  reconstructions shrunk).</li>
<li><b>L0</b> = mean number of non-zero codes per token; <b>L1</b> = mean Σ<sub>j</sub>|a<sub>tj</sub>|;
  <b>dead</b>: units that never fire on the eval split; <b>dense</b>: units firing on more than 10% of tokens.</li>
<li><b>CE</b>: next-token cross-entropy (nats per predicted token) on the first eval contexts, with x̂ spliced in at
  the site at every position but BOS; <b>CE rec. (zero)</b> = (CE<sub>zero</sub> − CE<sub>spliced</sub>) /
  (CE<sub>zero</sub> − CE<sub>clean</sub>), the same against mean ablation for <b>CE rec. (mean)</b>;
  <b>KL</b> = mean<sub>t</sub> KL(p<sub>clean</sub> ‖ p<sub>spliced</sub>). Splicing x̂ + (x − x̂) must give
  CE<sub>clean</sub>: its gap is in results.json (<code>error_added_ce_gap</code>).</li>
<li>Cluster quality, Euclidean, on a seeded sample of eval rows; a token's cluster is its nearest centroid (k-means),
  its most responsible component (mixtures), the first stage's centroid (residual k-means), or the unit with the
  largest |a<sub>j</sub>|·‖d<sub>j</sub>‖ (SAEs): <b>silhouette</b> = mean (b − a)/max(a, b);
  <b>Calinski–Harabasz</b> = [tr B/(k − 1)] / [tr W/(n − k)]; <b>Davies–Bouldin</b> = mean<sub>i</sub>
  max<sub>j≠i</sub> (s<sub>i</sub> + s<sub>j</sub>)/‖μ<sub>i</sub> − μ<sub>j</sub>‖; <b>inertia</b> = tr W / n;
  <b>size entropy</b> = −Σ p<sub>c</sub> ln p<sub>c</sub> over the whole eval split.</li>
<li>Mixtures: <b>loglik/token</b>, the held-out log-likelihood per token; <b>BIC</b> = −2·LL + p·ln N.</li>
<li>Cost: fit wall time (shared passes split evenly), the fit's peak resident memory, parameters, bytes of
  weights on disk, and encode throughput (tokens/s) on the eval split. Counted, not timed (the same on any
  machine): <b>encode FLOPs/token</b>, the products of one encoding (k-means 2Kd, diagonal GMM 4Kd, SAE
  2·d·latents), and <b>fit FLOPs</b>, rows seen × the work per row and pass (Lloyd 2Kd + d, EM 8Kd, SAE
  6 × the parameters of its two products); docs/metrics.md lists every count and what it leaves out.</li>
<li>Cross-seed stability (with <code>evaluate.stability</code> and two or more seeds): the fits of one entry that
  differ only in their seed, units matched one to one (Hungarian) by the cosine of their directions (decoder rows;
  centroids about their mean); the share of units whose match has cosine ≥ 0.7 (≥ 0.9), the mean matched cosine,
  and the same for as many random directions (the null), averaged over pairs of seeds.</li>
<li>How the fit ended: <b>epochs</b>, passes over the training rows; <b>rows seen</b>; <b>last change</b>, the
  last pass's relative change of the inertia (Lloyd) or log-likelihood (EM). A fit marked † stopped at its
  budget before its stopping rule (SAE <code>steps: auto</code>, Lloyd/EM <code>tol</code>) said converged.</li>
</ul>
<h3>Reading the Pareto plots</h3>
<p>Each point is one dictionary (mean over seeds); vertical bars: the 95% interval over held-out documents
where there is one, else ±1 std over seeds; horizontal bars: ±1 std over seeds. One colour per family, one
marker per variant; hollow markers: budget-limited fits. Down and to the left is better on FVU vs L0
(fewer active units, less unexplained variance); up and to the left on CE recovered vs L0. The dashed line joins
the points no other point beats on both axes: a method off the line is dominated by one on it. FVU vs fit time,
parameters, fit FLOPs and encode FLOPs read the same way, with cost on the x axis. Points in different panels
reconstruct different sites and are not comparable. A site with a single dictionary is a line of text, not a plot.
sites and are not comparable.</p>
"""


def _headline(groups: list[dict]) -> str:
    """The figure the report opens with, and a line for each panel with a single dictionary (no plot)."""
    data = headline(groups)
    out = ["<h2 id='headline'>FVU and CE recovered against L0</h2>"]
    if data:
        out.append(f"<img alt='FVU and CE recovered vs L0' src='{data}'>")
        out.append("<p class='small'>One colour per family, one marker per variant; error bars: the 95% interval "
                   "over held-out documents (y) and ±1 std over seeds (x); hollow markers: budget-limited fits; "
                   "dashed: the Pareto front.</p>")
    out.append(f"<p class='small'>{html.escape(interval_note(groups))}</p>")
    plotted = plotted_panels(groups, "l0", "fvu")
    for panel, gs in panels(groups).items():
        if panel not in plotted:
            for g in gs:
                out.append(f"<p>{html.escape(panel)}: one dictionary, {html.escape(label(g))}: "
                           f"{html.escape(_with_interval(g, 'fvu', 'FVU', '.4f'))}, "
                           f"{html.escape(_with_interval(g, 'ce_recovered_vs_zero', 'CE recovered', '.3f'))} "
                           f"at L0 {fmt(g['mean'].get('l0'), '.1f')}.</p>")
    return "".join(out)


def _bullets(title: str, lines: list[str]) -> str:
    return f"<h3>{html.escape(title)}</h3><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>" \
        if lines else ""


def interval_note(groups: list[dict]) -> str:
    """What the intervals are resampled over, or why there are none."""
    rows = [r for g in groups for r in g["rows"]]
    docs = max((r.get("fvu_documents") or 0 for r in rows), default=0)
    ce_docs = max((r.get("ce_recovered_vs_zero_documents") or 0 for r in rows), default=0)
    draws = max((len(r.get("draws", {}).get("fvu", [])) for r in rows), default=0)
    if docs < 2:
        return ("No intervals: " + (f"the eval split holds {docs} document" if docs else "the evaluation drew none")
                + "; a bootstrap over documents needs at least 2 (extract more documents, e.g. with "
                  "extract.contexts_per_document).")
    if draws == 0:
        return "No intervals: evaluate.bootstrap is 0."
    ce = (f"; CE recovered and KL over the {ce_docs} documents of the CE contexts" if ce_docs >= 2 else
          "; CE recovered and KL without intervals (their contexts come from fewer than 2 documents)")
    return (f"Intervals [in brackets]: 95% percentile bootstrap over the {docs} held-out documents ({draws} draws, "
            f"the same for every row){ce}. ± : std over seeds.")


def _with_interval(g: dict, key: str, name: str, spec: str) -> str:
    text = f"{name} {fmt(g['mean'].get(key), spec)}"
    if key in g["low"]:
        text += f" [{fmt(g['low'][key], spec)}, {fmt(g['high'][key], spec)}]"
    return text


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html and results.csv for a run directory holding results.json; returns the HTML path."""
    run = Path(run)
    if not (run / "results.json").exists():
        raise DictlabError(f"{run} holds no results.json: run `dictlab run` (or `dictlab evaluate --out`) first")
    saved = read_json(run / "results.json")
    results = saved["results"]
    if not results:
        raise DictlabError(f"{run / 'results.json'} holds no results")
    write_csv(results, run / "results.csv")
    groups = aggregate(results)
    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    plots = [
        ("FVU vs fit time", scatter(groups, "fit_seconds", "fvu", "fit time (s)", "FVU", "FVU vs fit time", True)),
        ("FVU vs parameters", scatter(groups, "n_parameters", "fvu", "parameters", "FVU", "FVU vs parameters", True)),
        ("FVU vs fit FLOPs", scatter(groups, "fit_flops", "fvu", "fit FLOPs (counted)", "FVU", "FVU vs fit FLOPs",
                                     True)),
        ("FVU vs encode FLOPs", scatter(groups, "encode_flops", "fvu", "encode FLOPs per token (counted)", "FVU",
                                        "FVU vs encode cost", True)),
        ("Cross-seed stability", stability_plot(groups)),
        ("Silhouette and inertia vs K", versus_k(groups)),
        ("Latent frequencies", frequencies(groups)),
        ("Training curves", training(run, groups)),
    ]
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dictlab report: "
        f"{html.escape(config.get('name', run.name))}</title><style>{CSS}</style></head><body>",
        f"<h1>dictlab report: {html.escape(config.get('name', run.name))}</h1>",
        f"<p class='small'>model {html.escape(str(config.get('model', '?')))} · corpus "
        f"{html.escape(str(config.get('corpus', {}).get('source', '?')))} · seeds "
        f"{html.escape(str(config.get('seeds') or 'one per entry'))} · dictlab {__version__} · written "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
        _headline(groups),
        "<h2 id='summary'>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary(groups)) + "</ul>",
        _bullets("Significance", significance_lines(groups)),
        comparisons_section(groups),
        controls_section(run, config) if config.get("control") and config.get("compare_with") else "",
        "<h2 id='reconstruction'>Reconstruction, sparsity and faithfulness</h2>",
        _table(groups, RECONSTRUCTION, run, "reconstruction-table"),
        "<h2 id='clusters'>Cluster quality and cost</h2>",
        _table(groups, CLUSTERS_AND_COST, run, "cost-table"),
    ]
    for title, data in plots:
        if data:
            parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='{data}'>")
    if (run / "interpretation.json").exists():
        interpretation = read_json(run / "interpretation.json")
        parts.append(interpretability(run, interpretation))
        write_unit_index_page(run, interpretation, config.get("name", run.name))
    parts.append(graphs_and_steering(run))
    parts.append(_provenance(saved))
    parts.append(DEFINITIONS)
    parts.append(SORT_SCRIPT)
    return write_page(parts, config, Path(out) if out else run / "report.html")


def _provenance(saved: dict) -> str:
    """The exact bytes behind the numbers: the store's manifest and each dictionary's weights, by sha256."""
    rows = sorted({(r["dictionary"], r.get("weights_sha256") or "not recorded") for r in saved["results"]})
    table = "".join(f"<tr><td>{html.escape(d)}</td><td><code>{html.escape(h)}</code></td></tr>" for d, h in rows)
    return ("<h2 id='provenance'>Provenance</h2><details><summary>store manifest sha256 "
            f"<code>{html.escape(saved.get('store_manifest_sha256') or 'not recorded')}</code>; each dictionary's "
            "weights sha256</summary><table><tr><th>dictionary</th><th>weights.safetensors sha256</th></tr>"
            f"{table}</table></details>")


def write_page(parts: list[str], config: dict, target: Path) -> Path:
    """Close a report page — the run's config folded away at the end — and write it atomically."""
    if config:
        import yaml

        parts.append("<h2>Config</h2><details><summary>the run's config (config.json)</summary><pre>"
                     + html.escape(yaml.safe_dump(config, sort_keys=False)) + "</pre></details>")
    parts.append("</body></html>")
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return target


def write_csv(results: list[dict], path: Path) -> None:
    keys = []
    for r in results:
        keys += [k for k in r if k not in keys and k not in CSV_SKIP]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in results:
            writer.writerow({k: r.get(k) for k in keys})

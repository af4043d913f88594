"""The report of a convergence run (`dictlab converge`, `dictlab report RUN`): one self-contained HTML
file from RUN/convergence.json — per pair of models, behaviour, the layer × layer heatmaps and
similarity-vs-depth curves, matched-feature tables; every number beside its null, interval and q-value.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dictlab import __version__
from dictlab.analyses.convergence.run import headlines
from dictlab.data.io import read_json
from dictlab.report.plots import figure_data, pyplot
from dictlab.report.run_report import CSS, write_page

METRIC_NAMES = {"cka": "linear CKA (debiased)", "svcca": "SVCCA", "knn": "mutual k-NN", "rsa": "RSA (Spearman)",
                "cosine": "cosine"}
EXTRA_CSS = """
td.ctx { text-align: left; font-family: ui-monospace, monospace; font-size: 11px; white-space: pre-wrap;
         max-width: 420px; }
td.ctx b { background: #ffe08a; }
td.out { text-align: left; white-space: pre-wrap; max-width: 420px; }
.sig { font-weight: bold; }
"""


def _num(v, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _p(v) -> str:
    return "–" if v is None else (f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}")


def _test_cells(t: dict, fdr: float, spec: str = ".3f") -> str:
    """observed [low, high] | null mean ± std | p | q | z, for one test record."""
    interval = f" [{_num(t['low'], spec)}, {_num(t['high'], spec)}]" if "low" in t else ""
    significant = t.get("q") is not None and t["q"] <= fdr
    return (f"<td data-value='{t['observed']!r}' class='{'sig' if significant else ''}'>"
            f"{_num(t['observed'], spec)}{interval}</td>"
            f"<td>{_num(t['null_mean'], spec)} ± {_num(t['null_std'], spec)}</td><td>{_p(t['p'])}</td>"
            f"<td>{_p(t.get('q'))}</td><td>{_num(t.get('z'), '.1f')}</td>")


TEST_HEAD = "<th>observed [interval]</th><th>null mean ± std</th><th>p</th><th>q (BH)</th><th>z vs null</th>"


def _behaviour(pair: dict, fdr: float) -> str:
    b = pair.get("behaviour")
    if not b:
        return ""
    nt = b["next_token"]
    parts = ["<h3>Behaviour</h3>",
             f"<p>Next-token predictions on the held-out text, at {nt['positions']} positions "
             f"({html.escape(nt['vocabulary'])} vocabulary; top {nt['top_k']} outcomes kept per position, holding "
             f"{100 * nt['top_k_mass_a']:.0f}% and {100 * nt['top_k_mass_b']:.0f}% of the two models' "
             f"probability).</p>",
             f"<table class='next-token'><thead><tr><th>measure</th>{TEST_HEAD}</tr></thead><tbody>"]
    for key, label in (("top1_agreement", "top-1 agreement"), ("jsd_bits", "Jensen–Shannon divergence (bits, top-k)")):
        parts.append(f"<tr><td class='text'>{label}</td>{_test_cells(nt[key], fdr)}</tr>")
    parts.append("</tbody></table>")
    if "outputs" not in b:
        parts.append(f"<p class='small'>{html.escape(b.get('outputs_note', ''))}</p>")
        return "\n".join(parts)
    o = b["outputs"]
    parts.append("<p>Similarity of the two models' outputs to the same prompts (cosine of all-MiniLM-L6-v2 "
                 "embeddings; null: outputs paired with other prompts of the suite).</p>"
                 f"<table class='suites'><thead><tr><th>suite</th><th>prompts</th>{TEST_HEAD}<th>band</th>"
                 "<th>Cohen's d</th></tr></thead><tbody>")
    for s in o["suites"]:
        parts.append(f"<tr><td class='text'>{html.escape(s['suite'])}</td><td>{s['n']}</td>{_test_cells(s, fdr)}"
                     f"<td class='text'>{s['band']}</td><td>{_num(s['cohens_d'], '.2f')}</td></tr>")
    parts.append("</tbody></table><details><summary>the outputs side by side</summary>"
                 f"<table><thead><tr><th>suite</th><th>prompt</th><th>{html.escape(pair['a'])}</th>"
                 f"<th>{html.escape(pair['b'])}</th><th>cosine</th></tr></thead><tbody>")
    for e in o["examples"]:
        parts.append(f"<tr><td class='text'>{html.escape(e['suite'])}</td><td "
                     f"class='out'>{html.escape(e['prompt'])}</td>"
                     f"<td class='out'>{html.escape(e['a'])}</td><td class='out'>{html.escape(e['b'])}</td>"
                     f"<td>{e['cosine']:.3f}</td></tr>")
    parts.append("</tbody></table></details>")
    return "\n".join(parts)


def ordered(rep: dict) -> list[str]:
    """The sweep's metrics in METRIC_NAMES order (JSON keeps them sorted by name)."""
    return [m for m in METRIC_NAMES if m in rep["metrics"]]


def depth_matched(rep: dict) -> list[tuple[int, int]]:
    """(index into layers_a, index into layers_b): for each compared A layer, the B layer nearest in
    relative depth ((layer + 1) / layers)."""
    da = (np.array(rep["layers_a"]) + 1) / rep["n_layers_a"]
    db = (np.array(rep["layers_b"]) + 1) / rep["n_layers_b"]
    return [(i, int(np.abs(db - d).argmin())) for i, d in enumerate(da)]


def _heatmaps(pair: dict) -> str:
    rep = pair["representation"]
    metrics = ordered(rep)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        value = np.array(rep["metrics"][m]["value"], dtype=float)
        image = ax.imshow(value, origin="lower", aspect="auto", cmap="viridis")
        ax.set_title(METRIC_NAMES[m], fontsize=9)
        ax.set_xlabel(f"{pair['b']} layer", fontsize=8)
        ax.set_ylabel(f"{pair['a']} layer", fontsize=8)
        ax.set_xticks(range(len(rep["layers_b"])), rep["layers_b"], fontsize=6)
        ax.set_yticks(range(len(rep["layers_a"])), rep["layers_a"], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return figure_data(fig)


def _depth_curves(pair: dict) -> str:
    rep = pair["representation"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    matched = depth_matched(rep)
    depth = [(rep["layers_a"][i] + 1) / rep["n_layers_a"] for i, _ in matched]
    for m in ordered(rep):
        r = rep["metrics"][m]
        pick = lambda key: np.array([r[key][i][j] for i, j in matched], dtype=float)  # noqa: E731
        line, = ax.plot(depth, pick("value"), marker="o", label=METRIC_NAMES[m])
        ax.fill_between(depth, pick("low"), pick("high"), color=line.get_color(), alpha=0.2)
        ax.plot(depth, pick("null_mean"), ls="--", lw=0.8, color=line.get_color())
    ax.set_xlabel(f"relative depth of the {pair['a']} layer (the {pair['b']} layer nearest in relative depth)")
    ax.set_ylabel("similarity")
    ax.set_title("similarity vs depth (bands: intervals; dashed: permutation null)", fontsize=9)
    ax.legend(fontsize=7)
    return figure_data(fig)


def _representation(pair: dict, fdr: float) -> str:
    rep = pair.get("representation")
    if not rep:
        return ""
    parts = ["<h3>Representation</h3>",
             f"<p>resid_post of every compared layer pair on the same {pair['documents']} documents × "
             f"{rep['positions_per_document']} aligned positions. A cell is bold where its q ≤ {fdr}.</p>"]
    counts = []
    for m in ordered(rep):
        r = rep["metrics"][m]
        q = np.array(r["q"], dtype=float)
        counts.append(f"{METRIC_NAMES[m]}: {int((q <= fdr).sum())} of {q.size} layer pairs above chance")
    parts.append("<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in counts) + "</ul>")
    parts.append(f"<img alt='layer × layer heatmaps' src='{_heatmaps(pair)}'>")
    parts.append(f"<img alt='similarity vs depth' src='{_depth_curves(pair)}'>")
    head = "".join(f"<th>{html.escape(METRIC_NAMES[m])}</th><th>null</th><th>q</th>" for m in ordered(rep))
    parts.append(f"<table class='depth'><thead><tr><th>{html.escape(pair['a'])} layer</th><th>{html.escape(pair['b'])} "
                 f"layer</th>{head}</tr></thead><tbody>")
    for i, j in depth_matched(rep):
        cells = ""
        for r in (rep["metrics"][m] for m in ordered(rep)):
            significant = r["q"][i][j] <= fdr
            cells += (f"<td class='{'sig' if significant else ''}' data-value='{r['value'][i][j]!r}'>"
                      f"{_num(r['value'][i][j])} [{_num(r['low'][i][j])}, {_num(r['high'][i][j])}]</td>"
                      f"<td>{_num(r['null_mean'][i][j])}</td><td>{_p(r['q'][i][j])}</td>")
        parts.append(f"<tr><td>{rep['layers_a'][i]}</td><td>{rep['layers_b'][j]}</td>{cells}</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _contexts(items: list[dict]) -> str:
    """A unit's top contexts, one a line (newlines of the text shown as ⏎), the token in bold."""
    flat = lambda text: html.escape(text.replace("\n", "⏎"))  # noqa: E731
    return "<br>".join(f"{flat(c['before'][-60:])}<b>{flat(c['token'])}</b>{flat(c['after'])}" for c in items)


def _dictionaries(pair: dict, fdr: float) -> str:
    d = pair.get("dictionaries") or {}
    if not d.get("matched") and not d.get("shared"):
        return ""
    parts = ["<h3>Dictionaries</h3>"]
    for m in d.get("matched", []):
        parts.append(f"<h4>{html.escape(m['dictionary'])}: {html.escape(pair['a'])} {m['site_a']} vs "
                     f"{html.escape(pair['b'])} {m['site_b']}</h4>"
                     f"<p>{m['live_a']} of {m['units_a']} and {m['live_b']} of {m['units_b']} units active on at least "
                     f"the minimum of the {m['tokens']} aligned tokens; matched when r &gt; {m['threshold']}.</p>"
                     f"<table class='matching'><thead><tr><th>measure</th>{TEST_HEAD}</tr></thead><tbody>")
        for key, label in (("best_above", f"share of {pair['a']}'s units with a best match above threshold"),
                           ("one_to_one_above", "share matched one-to-one above threshold"),
                           ("mean_best_r", "mean best r"),
                           ("replicated_r", "one-to-one r, matched on even documents, measured on odd ones"),
                           ("jaccard_per_token", "Jaccard of matched active sets per token (odd documents)")):
            parts.append(f"<tr><td class='text'>{label}</td>{_test_cells(m[key], fdr)}</tr>")
        parts.append(f"</tbody></table><p class='small'>replicated share above threshold: "
                     f"{m['replicated_above']:.3f}</p>")
        ex = m["examples"]
        parts.append(f"<table class='matched-units'><thead><tr><th>{html.escape(pair['a'])} unit</th>"
                     f"<th>{html.escape(pair['b'])} unit</th><th>r</th><th>{html.escape(pair['a'])}: top contexts</th>"
                     f"<th>{html.escape(pair['b'])}: top contexts</th></tr></thead><tbody>")
        for e in ex["matched"]:
            parts.append(f"<tr><td>{e['a']}</td><td>{e['b']}</td><td>{e['r']:.3f}</td><td class='ctx'>"
                         f"{_contexts(e['a_contexts'])}</td><td class='ctx'>{_contexts(e['b_contexts'])}</td></tr>")
        parts.append("</tbody></table>")
        for side, name in (("unmatched_a", pair["a"]), ("unmatched_b", pair["b"])):
            if ex[side]:
                parts.append(f"<p>Frequent units of {html.escape(name)} without a "
                             f"match:</p><table><thead><tr><th>unit</th>"
                             "<th>active tokens</th><th>best r</th><th>top contexts</th></tr></thead><tbody>")
                parts += [f"<tr><td>{e['unit']}</td><td>{e['active_tokens']}</td><td>{e['best_r']:.3f}</td>"
                          f"<td class='ctx'>{_contexts(e['contexts'])}</td></tr>" for e in ex[side]]
                parts.append("</tbody></table>")
    if d.get("shared"):
        parts.append(f"<h4>One dictionary applied to both models</h4><table class='shared'><thead><tr><th>dictionary"
                     f"</th><th>site</th><th>FVU {html.escape(pair['a'])}</th><th>FVU {html.escape(pair['b'])}</th>"
                     f"<th>L0 {html.escape(pair['a'])}</th><th>L0 {html.escape(pair['b'])}</th><th>Jaccard</th>"
                     f"{TEST_HEAD}</tr></thead><tbody>")
        for s in d["shared"]:
            for key, label in (("jaccard_per_token", "per token"), ("jaccard_per_prompt", "per prompt")):
                if key in s:
                    parts.append(f"<tr><td class='text'>{html.escape(s['dictionary'])} (fitted on "
                                 f"{html.escape(s['fitted_on'])})</td><td>{s['site']}</td><td>{s['fvu_a']:.4f}</td>"
                                 f"<td>{s['fvu_b']:.4f}</td><td>{s['l0_a']:.2f}</td><td>{s['l0_b']:.2f}</td>"
                                 f"<td class='text'>{label}</td>{_test_cells(s[key], fdr)}</tr>")
        parts.append("</tbody></table>")
    return "\n".join(parts)


DEFINITIONS = """
<h2 id="definitions">How to read this</h2>
<ul>
<li><b>Null</b>: every measure is recomputed with the documents shuffled against each other (model A's document d
  paired with model B's document π(d), position by position), so the null keeps what any two texts share (position,
  corpus) and breaks what the same text shares. p = (1 + #null ≥ observed) / (permutations + 1) (≤ for divergences);
  <b>q</b>: Benjamini–Hochberg across every test of the run; <b>z</b> = (observed − null mean) / null std.</li>
<li><b>Intervals</b>: layer pairs — observed ± z·s, s the standard deviation over half-samples of the documents
  drawn without replacement (pairwise statistics cannot take duplicated documents); everything else — percentile
  bootstrap over documents (prompts for outputs).</li>
<li><b>CKA</b>: debiased linear CKA (unbiased HSIC); <b>SVCCA</b>: mean canonical correlation of the principal
  subspaces holding 99% of the variance; <b>mutual k-NN</b>: mean share of the k cosine neighbours of a token the two
  models agree on; <b>RSA</b>: Spearman correlation of the pairwise cosine-distance matrices; <b>cosine</b>: mean
  cosine of the same token's activations (one residual space only).</li>
<li><b>Next token</b>: with one vocabulary, tokens compared by id at every compared position; with two, at
  word-aligned positions and by text without leading spaces, top-1 agreeing when one prediction's text begins the
  other's; the JSD is that of the two top-k distributions, each renormalised, over the union of their outcomes
  (1 bit for disjoint lists).</li>
<li><b>Bands</b> of output similarity: strong &gt; 0.7, moderate 0.4–0.7, weak below.</li>
<li><b>Units</b>: Pearson r of two units' activity on the aligned tokens; best match and one-to-one (Hungarian)
  matching over units active on at least the minimum of tokens.</li>
</ul>
"""


def write_convergence_report(run: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run)
    data = read_json(run / "convergence.json")
    config = read_json(run / "config.json") if (run / "config.json").exists() else {}
    fdr = data["tests"]["fdr"]
    models = "".join(f"<tr><td class='text'>{html.escape(m['name'])}</td><td "
                     f"class='text'>{html.escape(m['source'])}</td>"
                     f"<td>{m['n_layers']}</td><td>{m['d_model']}</td><td>{m['vocab_size']}</td>"
                     f"<td class='text'>{html.escape(str(m['start_token']))}</td>"
                     f"<td>{'yes' if m['chat'] else 'no'}</td>"
                     f"<td class='text'>{html.escape(', '.join(m['dictionaries']) or '–')}</td></tr>"
                     for m in data["models"])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dictlab convergence: "
             f"{html.escape(data['name'])}</title><style>{CSS}{EXTRA_CSS}</style></head><body>",
             f"<h1>dictlab convergence: {html.escape(data['name'])}</h1>",
             f"<p class='small'>corpus {html.escape(str(config.get('corpus', {}).get('source', '?')))} · "
             f"{len(data['documents'])} held-out documents · {len(data['prompts'])} prompts · dictlab {__version__} · "
             f"written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
             "<table class='models'><thead><tr><th>model</th><th>source</th><th>layers</th><th>d_model</th>"
             "<th>vocabulary</th><th>start token</th><th>chat template</th><th>dictionaries</th></tr></thead>"
             f"<tbody>{models}</tbody></table>",
             f"<p>{data['tests']['tests']} tests in all; {data['tests']['discoveries']} above chance at a false "
             f"discovery rate of {fdr} (Benjamini–Hochberg).</p>",
             "<h2 id='summary'>Summary</h2><pre class='summary'>" + html.escape("\n".join(headlines(data))) + "</pre>"]
    for pair in data["pairs"]:
        space = ("One residual space (same vocabulary and width)." if pair["shared_space"] else
                 "Different residual spaces: positions aligned by characters.")
        parts.append(f"<h2 id='{html.escape(pair['a'])}-vs-{html.escape(pair['b'])}'>{html.escape(pair['a'])} vs "
                     f"{html.escape(pair['b'])}</h2><p>{space} "
                     f"{pair['documents']} documents × {pair['positions_per_document']} aligned positions; "
                     f"{100 * pair['word_aligned_fraction']:.0f}% of them word-aligned.</p>")
        parts += [_behaviour(pair, fdr), _representation(pair, fdr), _dictionaries(pair, fdr)]
    parts.append(DEFINITIONS)
    return write_page(parts, config, Path(out) if out else run / "report.html")

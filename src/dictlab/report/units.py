"""The interpretability part of the report, from RUN/interpretation.json (interpret/stage.py): the
per-dictionary scores side by side with links to each dictionary's unit cards, the splitting links
across widths, the absorption rates, and the run's unit index (units.html)."""

from __future__ import annotations

import html
import statistics
from pathlib import Path

from dictlab.interpret.units import COHERENT_Z, DETECTED, SINGLE_TOKEN_SHARE
from dictlab.report.cards import write_unit_index
from dictlab.report.common import fmt, relative

# (summary key, header, format) of the scores table; "%" shows a fraction in percent
SCORES = [
    ("units", "units", "d"), ("units_firing", "firing", "d"), ("median_token_entropy", "median token entropy", ".3f"),
    ("single_token_fraction", "single-token", "%"), ("median_coherence", "median coherence z", ".2f"),
    ("coherent_fraction", "coherent", "%"), ("mean_detection", "mean detection", ".3f"),
    ("detected_fraction", "detected", "%"), ("monosemantic_fraction", "monosemantic", "%"),
    ("absorption", "absorption rate", ".4f"),
]
SPLITS_SHOWN = 12


def _name(entry: dict) -> str:
    return Path(entry["dictionary"]).name


def _tokens(entry: dict, unit: int) -> str:
    return " · ".join(entry["units"][unit]["tokens"][:3]).replace("\n", "⏎")


def write_unit_index_page(run: Path, data: dict, name: str) -> Path:
    dictionaries = [{"name": f"{e['site']}/{_name(e)}", "cards": relative(run, e["dictionary"]) + "/cards.html",
                     "units": e["units"]} for e in data["dictionaries"]]
    return write_unit_index(name, dictionaries, run / "units.html")


def section(run: Path, data: dict) -> str:
    """HTML of the interpretability section."""
    entries = data["dictionaries"]
    parts = ["<h2 id='interpretability'>Interpretability</h2>",
             f"<p>Every unit of every dictionary has a card (its top and sampled contexts with each token shaded by "
             f"the "
             f"unit's activation, its activation histogram and logit lens): follow a dictionary's name. "
             f"<a href='units.html'>The unit index</a> searches all {sum(len(e['units']) for e in entries)} units of "
             f"the run by the tokens they fire on.</p>"]
    parts += [f"<p class='small'>note: {html.escape(n)}</p>" for n in data.get("notes", [])]
    parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in highlights(entries)) + "</ul>")
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in SCORES)
    rows = []
    for e in entries:
        values = {**e["summary"], "absorption": (e.get("absorption") or {}).get("rate")}
        cells = "".join(f'<td data-key="{k}"' + ("" if values.get(k) is None else f' data-value="{values[k]!r}"')
                        + f">{fmt(values.get(k), spec)}</td>" for k, _, spec in SCORES)
        site = e["site"] + (f" → {e['target_site']}" if e.get("target_site") else "")
        rows.append(f'<tr data-dictionary="{html.escape(e["dictionary"])}"><td class="text">{html.escape(site)}</td>'
                    f'<td class="text"><a href="{html.escape(relative(run, e["dictionary"]))}/cards.html">'
                    f'{html.escape(_name(e))}</a></td><td class="text">{e["kind"]}s</td>{cells}</tr>')
    parts.append(f"<div class='scroll'><table id='interpretability-table'><thead><tr><th>site</th><th>dictionary "
                 f"(unit cards)</th><th>units are</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    parts.append(_splitting(run, data))
    parts.append(_absorption(entries))
    parts.append(DEFINITIONS)
    return "\n".join(parts)


def highlights(entries: list[dict]) -> list[str]:
    """Which dictionary leads on each score, quoting the numbers."""
    lines = []
    for key, what in (("monosemantic_fraction", "the most monosemantic units"),
                      ("coherent_fraction", "the most coherent units"), ("mean_detection", "the best-explained units")):
        scored = [e for e in entries if e["summary"].get(key) is not None]
        if scored:
            best = max(scored, key=lambda e: e["summary"][key])
            spec = ".3f" if key == "mean_detection" else "%"
            middle = statistics.median(e["summary"][key] for e in scored)
            lines.append(f"{what.capitalize()}: {_name(best)} ({best['site']}), {fmt(best['summary'][key], spec)} "
                         f"(median over the dictionaries {fmt(middle, spec)}).")
    measured = [e for e in entries if (e.get("absorption") or {}).get("rate") is not None]
    if measured:
        least = min(measured, key=lambda e: e["absorption"]["rate"])
        most = max(measured, key=lambda e: e["absorption"]["rate"])
        lines.append(f"Least first-letter absorption: {_name(least)}, rate {least['absorption']['rate']:.4f}; most: "
                     f"{_name(most)}, {most['absorption']['rate']:.4f}.")
    return lines


def _splitting(run: Path, data: dict) -> str:
    links = data.get("splitting") or []
    if not links:
        return ""
    by_folder = {e["dictionary"]: e for e in data["dictionaries"]}
    rows, trees = [], []
    for link in links:
        narrow, wide = by_folder.get(link["narrow"]), by_folder.get(link["wide"])
        label = f"{Path(link['narrow']).name} → {Path(link['wide']).name}"
        n_split = len(link["splits"])
        rows.append(f"<tr><td class='text'>{html.escape(link['site'])}</td><td class='text'>{html.escape(label)}</td>"
                    f"<td data-value='{link['agreement']!r}'>{fmt(link['agreement'], '%')}</td>"
                    f"<td data-value='{link['split_fraction']!r}'>{fmt(link['split_fraction'], '%')}</td>"
                    f"<td>{n_split}</td></tr>")
        if narrow is None or wide is None or not n_split:
            continue
        biggest = sorted(link["splits"].items(), key=lambda kv: -len(kv[1]))[:SPLITS_SHOWN]
        items = "".join(
            f"<li>{html.escape(_name(narrow))} unit <a href='{html.escape(relative(run, link['narrow']))}/cards.html"
            f"#unit={parent}'>{parent}</a> [{html.escape(_tokens(narrow, int(parent)))}] → "
            + ", ".join(f"<a href='{html.escape(relative(run, link['wide']))}/cards.html#unit={c}'>{c}</a> "
                        f"[{html.escape(_tokens(wide, c))}]" for c in children) + "</li>"
            for parent, children in biggest)
        trees.append(f"<details><summary>{html.escape(label)}: the {len(biggest)} parents with the most children "
                     f"(of {n_split} that split)</summary><ul class='small'>{items}</ul></details>")
    return ("<h3 id='splitting'>Feature splitting across widths</h3><p>For each dictionary and the next wider one of "
            "the same entry, every wide unit's parent by decoder cosine and by co-activation on the split; "
            "<b>agreement</b>: the fraction of firing wide units whose two parents agree; <b>parents split</b>: the "
            "fraction of narrow units that two or more wide units choose by both (their children).</p>"
            "<div class='scroll'><table id='splitting-table'><thead><tr><th>site</th><th>narrow → wide</th>"
            "<th>agreement</th><th>parents split</th><th>split parents</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>" + "".join(trees))


def _absorption(entries: list[dict]) -> str:
    measured = [e for e in entries if e.get("absorption")]
    if not measured:
        return ""
    rows = []
    for e in measured:
        letters = e["absorption"]["letters"]
        worst = sorted((v["rate"], k) for k, v in letters.items() if v["rate"] is not None)[::-1][:3]
        positives = sum(v["true_positives"] for v in letters.values())
        rows.append(f"<tr><td class='text'>{html.escape(e['site'])}</td><td class='text'>{html.escape(_name(e))}</td>"
                    f"<td>{fmt(e['absorption']['rate'], '.4f')}</td><td>{len(letters)}</td><td>{positives}</td>"
                    f"<td class='text'>{', '.join(f'{k} {r:.3f}' for r, k in worst)}</td></tr>")
    return ("<h3 id='absorption'>Feature absorption (first letter)</h3><div class='scroll'><table "
            "id='absorption-table'>"
            "<thead><tr><th>site</th><th>dictionary</th><th>absorption rate</th><th>letters</th><th>probe true "
            "positives</th><th>most absorbed letters</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></div>")


DEFINITIONS = f"""
<h3>Interpretability scores</h3>
<ul>
<li>Examples: a latent's top activations and random activations from each fifth of its range; a cluster's most
  typical members (closest to its centre, or highest density for a mixture component) and random members; all from
  the store split <code>interpret.split</code> (default: eval, documents never seen in fitting).</li>
<li><b>token entropy</b>: the entropy (nats) of the tokens at a unit's examples; 0 when it fires on one token.
  <b>single-token</b>: the fraction of firing units with at least {SINGLE_TOKEN_SHARE:.0%} of their examples on one
  token.</li>
<li><b>coherence z</b>: the mean pairwise cosine of the all-MiniLM-L6-v2 embeddings of a unit's top contexts, as a
  z-score against random groups of as many random contexts. <b>coherent</b>: z ≥ {COHERENT_Z:g}.</li>
<li><b>detection</b> (with an explainer endpoint): the balanced accuracy of a language model telling held-out firing
  contexts from silent ones, given only its own explanation of the top contexts. <b>detected</b>: ≥ {DETECTED:g}.</li>
<li><b>monosemantic</b>: the fraction of firing units that are single-token, coherent or detected.</li>
<li><b>absorption rate</b> (latent dictionaries): on the first-letter task, a logistic probe per letter on the
  activations (trained on the even-numbered contexts of a sample of the split, measured on the odd); the main
  unit is the one whose decoder is most cosine-similar to the probe. Of the tokens the
  probe gets right, the fraction where the main unit is silent and another unit with cosine ≥ 0.025 to the probe
  carries ≥ 40% of the probe projection (SAEBench's thresholds). Clusters are not measured: one unit per token.</li>
</ul>
"""

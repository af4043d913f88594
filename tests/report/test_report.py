import csv
import json

import numpy as np
import pytest

from dictlab.cli import main
from dictlab.report.common import aggregate, pareto
from dictlab.report.run_report import _headline, interval_note


def test_seeds_aggregate_to_mean_and_sample_std():
    rows = [{"group": "g", "site": "s", "method": "m", "decoding": None, "fvu": v, "seed": i, "note": "x"}
            for i, v in enumerate((0.1, 0.2, 0.3))]
    rows.append({"group": "h", "site": "s", "method": "m", "decoding": None, "fvu": 0.5, "seed": 0, "note": "x"})
    g, h = aggregate(rows)
    assert g["n"] == 3 and g["mean"]["fvu"] == pytest.approx(0.2) and g["std"]["fvu"] == pytest.approx(0.1)
    assert h["n"] == 1 and h["std"]["fvu"] == 0 and "note" not in g["mean"]


def test_seed_groups_carry_the_interval_of_their_mean_draws_and_sites_with_one_dictionary_get_a_line():
    def row(group, site, fvu, draws, seed=0):
        return {"group": group, "site": site, "method": "m", "decoding": None, "fvu": fvu, "l0": 2.0, "seed": seed,
                "fvu_documents": 5, "draws": {"fvu": draws}, "family": "SAEs"}

    rows = [row("s/a/-", "s", 0.2, [0.1, 0.2, 0.3, 0.4], 0), row("s/a/-", "s", 0.4, [0.3, 0.4, 0.5, 0.6], 1),
            row("t/b/-", "t", 0.5, [0.5, 0.5, 0.5, 0.5])]
    a, b = aggregate(rows)
    assert list(a["draws"]["fvu"]) == pytest.approx([0.2, 0.3, 0.4, 0.5])  # the seed mean of each draw
    assert a["low"]["fvu"] == pytest.approx(0.2075) and a["high"]["fvu"] == pytest.approx(0.4925)
    page = _headline([a, b])
    assert "<img" not in page  # neither site has two dictionaries to compare
    assert "t: one dictionary, b: FVU 0.5000 [0.5000, 0.5000]" in page and "s: one dictionary" in page
    assert "over the 5 held-out documents (4 draws" in interval_note([a, b])
    one_doc = aggregate([{**rows[2], "fvu_documents": 1, "draws": {}}])
    assert interval_note(one_doc).startswith("No intervals: the eval split holds 1 document")


def test_pareto_front():
    points = [(1, 0.30), (1, 0.25), (2, 0.20), (4, 0.22), (8, 0.10), (16, 0.10)]
    assert pareto(points) == [1, 2, 4]
    assert pareto([(1, 0.7), (2, 0.9), (4, 0.8)], higher_y_better=True) == [0, 1]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, pile_dir, tiny_models, write_run_config):
    """A tiny run with two seeds of k-means and of a TopK SAE, through `dictlab run`."""
    tmp = tmp_path_factory.mktemp("report")
    config = tmp / "c.yaml"
    write_run_config(config, "rep", tiny_models["llama"], pile_dir, train_tokens=1200,
                     fit=[{"method": "kmeans", "k": [3, 6]},
                          # steps: auto whose budget (40 steps) runs out before its first validation check
                          {"method": "sae", "latents": [16], "k": 2, "steps": "auto", "max_tokens": 40 * 64,
                           "validation_tokens": 64, "validate_every": 50, "batch_size": 64, "lr": 3e-3,
                           "warmup_steps": 5}])
    text = config.read_text() + "seeds: [0, 1]\nevaluate:\n  ce_contexts: 6\n  cluster_sample: 300\n  stability: true\n"
    config.write_text(text)
    assert main(["--quiet", "--runs-dir", str(tmp / "runs"), "run", str(config)]) == 0
    return tmp / "runs" / "rep"


def test_run_writes_the_report_and_the_csv(reported_run):
    results = json.loads((reported_run / "results.json").read_text())["results"]
    assert len(results) == 2 * (2 * 2 + 1)  # seeds x (two K x two decodings + one SAE)
    assert {r["seed"] for r in results} == {0, 1}
    with open(reported_run / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results) and float(table[0]["fvu"]) == pytest.approx(results[0]["fvu"])
    page = (reported_run / "report.html").read_text()
    for section in ("FVU and CE recovered against L0", "Summary", "Significance", "Paired comparisons",
                    "Reconstruction, sparsity and faithfulness", "Cluster quality and cost",
                    "Silhouette and inertia vs K", "Training curves", "Metric definitions", "Reading the Pareto plots"):
        assert section in page, section
    assert page.index("FVU and CE recovered against L0") < page.index("Summary")  # the report leads with its answer
    # two seeds, stability on: each row says how many of its units the other seed's fit learned too
    assert all(0 <= r["stability_above_0.7"] <= 1 and "stability_null_above_0.7" in r for r in results)
    assert "Cross-seed stability" in page and "units matched across seeds" in page
    assert "95% percentile bootstrap over the" in page
    assert "nearest SAE in L0 and in parameters" in page and "next on the FVU–L0 front" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing to fetch
    assert " ± " in page  # two seeds: mean ± std
    # how each fit ended: Lloyd to its tolerance or its max_iter; the SAEs at their budget, marked so
    for r in results:
        assert r["epochs"] >= 1 if r["method"] == "kmeans" else r["converged"] is False
    sae = [r for r in results if r["method"] == "sae-topk"]
    train_rows = json.loads((reported_run / "dictionaries" / "L1.resid_post" / "sae-topk-n16-k2-s0" /
                             "config.json").read_text())["train_rows"]
    assert all(r["tokens_seen"] == 40 * 64 for r in sae)
    assert 0 < train_rows - 40 * 64 / sae[0]["epochs"] <= 64 + 16  # the validation slice was held out of training
    assert "sae-topk †" in page and "budget-limited: the fit stopped at its budget" in page
    assert "kmeans †" not in page or any(r["converged"] is False for r in results if r["method"] == "kmeans")


def test_report_needs_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no results.json" in capsys.readouterr().err


def test_report_renders_in_headless_chromium_with_the_numbers_of_results_json(reported_run, headless_chromium):
    browser = headless_chromium()
    try:
        browser.get((reported_run / "report.html").resolve().as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) >= 6
        for alt, complete, width, height in images:
            assert complete and width > 100 and height > 100, alt
        cells = browser.execute_script(
            "return Array.from(document.querySelectorAll('#reconstruction-table tbody tr')).map(tr => "
            "[tr.dataset.group, Object.fromEntries(Array.from(tr.querySelectorAll('td[data-value]')).map("
            "td => [td.dataset.key, [Number(td.dataset.value), Number(td.dataset.std)]]))])")
        # tables sort by a clicked column (again: reversed), keep their header in view, scroll inside the page
        fvu = ("const t = document.getElementById('reconstruction-table');"
               "const i = Array.from(t.tHead.rows[0].cells).findIndex(th => th.textContent === 'FVU');")
        read = "return Array.from(t.tBodies[0].rows).map(r => Number(r.cells[i].dataset.value))"
        orders = [browser.execute_script(fvu + "t.tHead.rows[0].cells[i].click();" + read) for _ in range(2)]
        layout = browser.execute_script(
            "const t = document.getElementById('reconstruction-table');"
            "return [getComputedStyle(t.tHead.rows[0].cells[0]).position, getComputedStyle(t.parentElement).overflowY,"
            "        t.parentElement.style.maxHeight || getComputedStyle(t.parentElement).maxHeight]")
    finally:
        browser.quit()
    assert orders[0] == sorted(orders[0]) and orders[1] == sorted(orders[0], reverse=True) and len(orders[0]) > 2
    assert layout[:2] == ["sticky", "auto"] and layout[2].endswith("px")
    results = json.loads((reported_run / "results.json").read_text())["results"]
    by_group = {}
    for r in results:
        by_group.setdefault(r["group"], []).append(r)
    assert {group for group, _ in cells} == set(by_group)
    for group, values in cells:
        rows = by_group[group]
        assert {"fvu", "l0", "cosine", "ce_recovered_vs_zero"} <= set(values)
        for key, (mean, std) in values.items():
            seeds = [r[key] for r in rows]
            assert mean == pytest.approx(sum(seeds) / len(seeds), rel=1e-12, abs=1e-12), (group, key)
            spread = (sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1)) ** 0.5
            assert std == pytest.approx(spread, rel=1e-9, abs=1e-12), (group, key)


def test_the_run_interprets_every_dictionary_with_splitting_across_widths_and_absorption(reported_run):
    from pathlib import Path

    data = json.loads((reported_run / "interpretation.json").read_text())
    folders = sorted(str(p.parent) for p in (reported_run / "dictionaries").glob("*/*/config.json"))
    assert sorted(e["dictionary"] for e in data["dictionaries"]) == folders
    for entry in data["dictionaries"]:
        own = json.loads((Path(entry["dictionary"]) / "interpretation.json").read_text())
        assert own["summary"] == entry["summary"] and len(own["units"]) == len(entry["units"])
        assert [u["unit"] for u in entry["units"]] == list(range(len(own["units"])))
        assert (Path(entry["dictionary"]) / "cards.html").exists()
        assert ("absorption" in entry) == (entry["kind"] == "latent")  # clusters: one unit per token, not measured
    # the k-means widths of each seed form a chain; the single-width SAE forms none
    links = sorted((Path(link["narrow"]).name, Path(link["wide"]).name) for link in data["splitting"])
    assert links == [("kmeans-k3-s0", "kmeans-k6-s0"), ("kmeans-k3-s1", "kmeans-k6-s1")]
    for link in data["splitting"]:
        assert 0 <= link["agreement"] <= 1 and 0 <= link["split_fraction"] <= 1
        assert all(len(children) >= 2 and max(children) < 6 for children in link["splits"].values())
    page = (reported_run / "report.html").read_text()
    assert "Interpretability" in page and "Feature splitting across widths" in page and "units.html" in page


def test_interpretability_section_and_unit_index_render_in_headless_chromium(reported_run, headless_chromium):
    data = json.loads((reported_run / "interpretation.json").read_text())
    browser = headless_chromium()
    try:
        browser.get((reported_run / "report.html").resolve().as_uri())
        cells = browser.execute_script(
            "return Array.from(document.querySelectorAll('#interpretability-table tbody tr')).map(tr => "
            "[tr.dataset.dictionary, Object.fromEntries(Array.from(tr.querySelectorAll('td[data-value]')).map("
            "td => [td.dataset.key, Number(td.dataset.value)]))])")
        summaries = {e["dictionary"]: e["summary"] for e in data["dictionaries"]}
        assert {d for d, _ in cells} == set(summaries)
        for dictionary, values in cells:
            assert {"units", "units_firing", "median_token_entropy", "monosemantic_fraction"} <= set(values)
            for key, value in values.items():
                expected = summaries[dictionary].get(key)
                if key == "absorption":
                    entry = next(e for e in data["dictionaries"] if e["dictionary"] == dictionary)
                    expected = entry["absorption"]["rate"]
                assert value == pytest.approx(expected, rel=1e-12), (dictionary, key)

        browser.get((reported_run / "units.html").resolve().as_uri())
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        total = sum(len(e["units"]) for e in data["dictionaries"])
        assert len(browser.find_elements("css selector", "#rows tr")) == min(total, 1000)
        number, unit = next((i, u) for i, e in enumerate(data["dictionaries"]) for u in e["units"]
                                   if u["tokens"] and u["tokens"][0].strip().isalnum())
        token = unit["tokens"][0].strip()
        search = browser.find_element("css selector", "#search")
        search.send_keys(token)
        shown = browser.execute_script("return Array.from(document.querySelectorAll('#rows tr')).map(tr => "
                                       "tr.textContent.toLowerCase())")
        assert shown and all(token.lower() in text for text in shown)
        link = browser.find_element(
            "css selector", f'#rows tr[data-dictionary="{number}"][data-unit="{unit["unit"]}"] td:nth-child(2) a')
        link.click()  # the unit's own card, through cards.html#unit=N
        assert browser.find_element("css selector", "#card h2").text == f"unit {unit['unit']}"
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


def test_matched_comparisons_pair_clusters_with_the_nearest_sae_in_l0_and_in_parameters():
    from dictlab.report.comparisons import comparisons, significance_lines

    def row(name, kind, l0, params, fvu, draws):
        return {"group": f"s/{name}/-", "site": "s", "method": name, "decoding": None, "unit_kind": kind,
                "l0": l0, "n_parameters": params, "fvu": fvu, "draws": {"fvu": draws}}

    groups = aggregate([row("km", "cluster", 1.0, 100, 0.50, [0.48, 0.50, 0.52, 0.51]),
                        row("small-l0", "latent", 2.0, 10_000, 0.40, [0.39, 0.40, 0.41, 0.40]),
                        row("small", "latent", 30.0, 150, 0.49, [0.49, 0.51, 0.50, 0.53])])
    found = {(c["a"]["method"], c["b"]["method"], c["matched"]): c["differences"]["fvu"] for c in comparisons(groups)}
    assert set(found) == {("km", "small-l0", "nearest SAE in L0"), ("km", "small", "nearest SAE in parameters"),
                          ("km", "small-l0", "next on the FVU–L0 front")}
    by_l0 = found["km", "small-l0", "nearest SAE in L0"]
    assert by_l0["difference"] == pytest.approx(0.10) and by_l0["significant"]
    paired = np.array([0.48, 0.50, 0.52, 0.51]) - np.array([0.39, 0.40, 0.41, 0.40])  # draw by draw
    assert (by_l0["low"], by_l0["high"]) == pytest.approx(tuple(np.quantile(paired, [0.025, 0.975])))
    assert not found["km", "small", "nearest SAE in parameters"]["significant"]  # draws -0.01 .. +0.01
    (line,) = significance_lines(groups)
    assert line.startswith("[s] FVU: 2 of 3 paired differences exclude zero; the largest, km − small-l0")
    assert line.endswith("+0.1000 [+0.0907, +0.1100]; not distinguishable here: km vs small.")


def test_among_saes_of_equal_parameters_the_nearest_in_l0_is_matched():
    from dictlab.report.comparisons import comparisons

    def row(name, kind, l0, params):
        return {"group": f"s/{name}/-", "site": "s", "method": name, "decoding": None, "unit_kind": kind,
                "l0": l0, "n_parameters": params, "fvu": 0.5}

    groups = aggregate([row("km", "cluster", 1.0, 100), row("k32", "latent", 32.0, 1000),
                        row("k4", "latent", 4.0, 1000), row("k16", "latent", 16.0, 1000),
                        {**row("pca", "latent", 1.0, 100), "family": "baselines"}])  # a baseline is not an SAE
    assert {(c["b"]["method"], c["matched"]) for c in comparisons(groups) if c["a"]["method"] == "km"} == {
        ("k4", "nearest SAE in L0 and in parameters")}

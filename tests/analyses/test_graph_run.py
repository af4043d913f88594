"""The graph and steering stages of `dictlab run`: two layers of a tiny model, within- and cross-layer
graphs, a steering comparison with downstream drift, reuse, bad names, and the report's section."""

import json

import pytest
import yaml

from dictlab.cli import main

A, B = "L1.resid_post/sae-topk-n32-k4", "L2.resid_post/sae-topk-n32-k4"


def _config(write_run_config, path, pile_dir, model, **steer):
    write_run_config(path, "gs", model, pile_dir, sites=("resid_post", "L2.resid_post"), train_tokens=1200,
                     fit=[{"method": "sae", "latents": [32], "k": 4, "steps": 40, "batch_size": 64, "lr": 3e-3,
                           "warmup_steps": 4}])
    data = yaml.safe_load(path.read_text())
    data["interpret"] = {"coherence": False, "absorption": False}
    data["graph"] = {"dictionaries": [A, B], "min_r": 0.05, "min_count": 1}
    data["steer"] = {"dictionary": A, "downstream": B, "n_units": 2, "alphas": [0.1, 0.5], "contexts": 3,
                     "new_tokens": 3, **steer}
    path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory, pile_dir, tiny_models, write_run_config):
    tmp = tmp_path_factory.mktemp("graphrun")
    _config(write_run_config, tmp / "c.yaml", pile_dir, tiny_models["llama"])
    assert main(["--quiet", "--runs-dir", str(tmp / "runs"), "run", str(tmp / "c.yaml")]) == 0
    return tmp


def test_the_run_builds_within_and_cross_layer_graphs_and_a_steering_comparison(graph_run):
    run = graph_run / "runs" / "gs"
    names = sorted(p.name for p in (run / "graphs").iterdir())
    assert names == ["L1.resid_post.sae-topk-n32-k4", "L1.resid_post.sae-topk-n32-k4__L2.resid_post.sae-topk-n32-k4",
                     "L2.resid_post.sae-topk-n32-k4"]
    cross = json.loads((run / "graphs" / names[1] / "summary.json").read_text())
    assert [s["site"] for s in cross["sides"]] == ["L1.resid_post", "L2.resid_post"] and cross["edges"] > 0
    steering = json.loads((run / "steering.json").read_text())
    units = list(dict.fromkeys(r["unit"] for r in steering["steering"]))
    alone = {r["unit"] for r in steering["ablation"] if isinstance(r["unit"], int)}
    assert len(units) == 2 and set(units) <= alone and steering["downstream"]["site"] == "L2.resid_post"
    # the units picked are those with the most edges in the within-layer graph
    edges = json.loads((run / "graphs" / names[0] / "graph.json").read_text())["edges"]
    degree = {}
    for e in edges:
        for end in (e["source"], e["target"]):
            degree[int(end[1:])] = degree.get(int(end[1:]), 0) + 1
    assert sorted(degree[u] for u in units) == sorted(degree.values())[-2:]
    for r in steering["steering"]:
        assert {"target", "drift", "kl", "lens", "loss", "downstream_drift"} <= set(r)
        mean, low, high = r["downstream_drift"]
        assert mean > 0 and low <= mean <= high
    assert sorted(next(r["unit"] for r in steering["ablation"] if isinstance(r["unit"], list))) == sorted(units)
    assert any(r["mode"] == "corrective" for r in steering["steering"])
    assert any("downstream_linked" in r for r in steering["steering"]) and steering["linked"]
    stamps = {p: p.stat().st_mtime_ns for p in [run / "steering.json", *run.glob("graphs/*/summary.json")]}
    assert main(["--quiet", "--runs-dir", str(graph_run / "runs"), "run", str(graph_run / "c.yaml")]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # unchanged inputs: everything reused


def test_unknown_dictionary_names_are_refused_before_anything_runs(tmp_path, pile_dir, tiny_models, capsys,
                                                                   write_run_config):
    _config(write_run_config, tmp_path / "c.yaml", pile_dir, tiny_models["llama"],
            dictionary="L1.resid_post/sae-topk-n64-k4",
            downstream=None)
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "graph/steer name dictionaries the run does not fit: L1.resid_post/sae-topk-n64-k4" in err
    assert f"the run fits: {A}, {B}" in err and not (tmp_path / "runs" / "gs" / "store").exists()


def test_graph_and_steering_section_renders_in_headless_chromium(graph_run, headless_chromium):
    run = graph_run / "runs" / "gs"
    steering = json.loads((run / "steering.json").read_text())
    browser = headless_chromium()
    try:
        browser.get((run / "report.html").resolve().as_uri())
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        graphs = browser.execute_script(
            "return Array.from(document.querySelectorAll('#graphs-table tbody tr')).map(tr => "
            "[tr.dataset.graph, Number(tr.querySelector('td[data-key=edges]').textContent)])")
        for name, edges in graphs:
            assert edges == json.loads((run / "graphs" / name / "summary.json").read_text())["edges"]
        assert len(graphs) == 3
        rows = browser.execute_script(
            "return Array.from(document.querySelectorAll('#steering-table tbody tr')).map(tr => "
            "[Number(tr.dataset.unit), tr.dataset.mode, Array.from(tr.querySelectorAll('td[data-value]')).map("
            "td => [Number(td.dataset.low), Number(td.dataset.value), Number(td.dataset.high)])])")
        assert len(rows) == len(steering["steering"])
        for (unit, mode, cells), r in zip(rows, steering["steering"]):
            assert (unit, mode) == (r["unit"], r["mode"])
            assert cells[0] == pytest.approx([r["target"][1], r["target"][0], r["target"][2]], rel=1e-12)
        shown = browser.find_elements("css selector", "#generations-table tbody tr")
        assert len(shown) == 1 + len(steering["generations"]["steered"])
        assert len(browser.find_elements("css selector", "#ablation-table tbody tr")) == len(steering["ablation"])
        cards = browser.find_elements("css selector", "#steering-units a[href*='sae-topk-n32-k4/cards.html#unit=']")
        assert sorted(int(a.get_attribute("href").rsplit("=", 1)[1]) for a in cards) == sorted(
            {r["unit"] for r in steering["steering"]})  # each steered unit links to its card
    finally:
        browser.quit()


def test_a_graph_without_edges_falls_back_to_the_strongest_units_and_transcoders_are_refused(
        tmp_path, pile_dir, tiny_models, write_run_config):
    from dictlab.analyses.stages import check_names
    from dictlab.config import ExperimentConfig
    from dictlab.errors import DictlabError
    from dictlab.pipeline import planned_folders

    _config(write_run_config, tmp_path / "c.yaml", pile_dir, tiny_models["llama"], downstream=None, alphas=[0.5])
    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    data["graph"] = {"min_r": 0.99}  # no edge survives
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(tmp_path / "c.yaml")]) == 0
    steering = json.loads((tmp_path / "runs" / "gs" / "steering.json").read_text())
    assert steering["units_picked_by"].startswith("largest mean code")
    assert len({r["unit"] for r in steering["steering"]}) == 2
    # no neighbours to hold: no corrective mode (diffmean where the unit is active on some tokens, not all)
    assert {r["mode"] for r in steering["steering"]} - {"diffmean"} == {"plain", "random"}
    assert "id='steering'" in (tmp_path / "runs" / "gs" / "report.html").read_text()
    del data["graph"], data["steer"]  # the same run without graphs and steering: the report drops both sections
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(tmp_path / "c.yaml")]) == 0
    page = (tmp_path / "runs" / "gs" / "report.html").read_text()
    assert "id='steering'" not in page and "id='graphs'" not in page
    transcoder = {"method": "sae", "latents": [32], "k": 4, "site": "L1.resid_mid", "target_site": "L1.mlp_out"}
    cfg = ExperimentConfig.model_validate({**data, "fit": [transcoder],
                                           "steer": {"dictionary": "L1.resid_mid/transcoder-topk-n32-k4"}})
    with pytest.raises(DictlabError, match="is a transcoder"):
        check_names(cfg.graph, cfg.steer, planned_folders(cfg))

"""A random-weights control run beside its trained run: the same documents, a Controls section in the
control run's report with paired FVU differences, and the control recorded in the store's spec."""

import json

import pytest
import yaml

from dictlab.cli import main


def test_a_control_run_reports_every_dictionary_beside_the_trained_one(tmp_path, pile_dir, tiny_models,
                                                                       write_run_config):
    fit = [{"method": "kmeans", "k": [3]}, {"method": "pca", "k": [2]}]
    trained = write_run_config(tmp_path / "trained.yaml", "ctl", tiny_models["llama"], pile_dir, train_tokens=800,
                               fit=fit)
    config = yaml.safe_load(trained.read_text())
    config.update(name="ctl-random", control="random_weights", control_seed=7, compare_with="ctl")
    control = tmp_path / "control.yaml"
    control.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    for path in (trained, control):
        assert main(["--quiet", "--runs-dir", str(runs), "run", str(path)]) == 0
    manifest = json.loads((runs / "ctl-random" / "store" / "manifest.json").read_text())
    assert manifest["spec"]["model"].endswith("+random_weights:7")  # the store records the control
    results = {name: {r["group"]: r for r in json.loads((runs / name / "results.json").read_text())["results"]}
               for name in ("ctl", "ctl-random")}
    assert results["ctl"].keys() == results["ctl-random"].keys()
    assert all(results["ctl"][g]["fvu"] != results["ctl-random"][g]["fvu"] for g in results["ctl"])
    assert all(results["ctl"][g]["fvu_documents"] == results["ctl-random"][g]["fvu_documents"]
               for g in results["ctl"])  # the same held-out documents: FVU differences are paired
    page = (runs / "ctl-random" / "report.html").read_text()
    assert "Controls: trained vs random weights" in page and "CE recovered means little here" in page
    table = page[page.index("id='controls-table'"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + len(results["ctl"])  # the header and one row per dictionary and decoding
    assert "[" in table.split("<tr>")[2]  # a paired interval
    # the trained run's report has no Controls section, and a control run under the trained run's name is refused
    assert "Controls: trained" not in (runs / "ctl" / "report.html").read_text()
    config.update(name="ctl")
    control.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "compare_with"}))
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(control)]) == 2


def test_compare_with_needs_a_control_and_another_run():
    from dictlab.config import ExperimentConfig

    with pytest.raises(ValueError, match="compare_with sets a control run beside its trained run: set control"):
        ExperimentConfig(name="a", compare_with="b")
    with pytest.raises(ValueError, match="compare_with names this run"):
        ExperimentConfig(name="a", control="random_weights", compare_with="a")

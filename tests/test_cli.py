import subprocess
import sys

import pytest

from dictlab.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dictlab.cli", *map(str, args)], capture_output=True, text=True)


def one_line_error(result, *needles):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("dictlab: error:") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[-1]


def test_unknown_key_names_it_and_the_accepted_ones(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nextract:\n  layer: [3]\n")
    one_line_error(run_cli("run", cfg), "unknown key 'extract.layer'", "layers", "sites")


def test_malformed_yaml_and_missing_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: [x\n")
    one_line_error(run_cli("run", cfg), "malformed YAML")
    one_line_error(run_cli("run", tmp_path / "nope.yaml"), "not found")


def test_bad_values_name_the_value(tmp_path, tiny_models):
    one_line_error(run_cli("extract", "--model", "gemma-9000", "--out", tmp_path / "s"), "unknown model 'gemma-9000'")
    one_line_error(run_cli("extract", "--model", tiny_models["llama"], "--corpus", tmp_path / "x.csv",
                           "--out", tmp_path / "s"), "not found")
    one_line_error(run_cli("extract", "--model", tiny_models["llama"], "--layers", "9", "--corpus", "embedded",
                           "--out", tmp_path / "s"), "layer 9 is out of range", "3 layers")
    one_line_error(run_cli("extract", "--train-tokens", "0", "--out", tmp_path / "s"), "train_tokens")
    # nothing was left behind that a later run would trust
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("--debug", "run", tmp_path / "nope.yaml")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "extract", "fit", "evaluate", "store"):
        assert command in out


def test_fit_entries_are_checked_per_method(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nfit:\n  - method: gmm\n    q: 3\n")
    one_line_error(run_cli("run", cfg), "unknown key 'fit.0.q'", "covariance", "reg_covar")
    cfg.write_text("name: x\nfit:\n  - method: kmedoids\n")
    one_line_error(run_cli("run", cfg), "kmedoids", "residual_kmeans", "mppca")
    cfg.write_text("name: x\nfit:\n  - method: sae\n    k: [4, 4]\n")
    one_line_error(run_cli("run", cfg), "k lists a value twice: [4, 4]")
    cfg.write_text("name: x\nfit:\n  - method: sae\n    rule: relu\n    k: [4, 8]\n")
    one_line_error(run_cli("run", cfg), "a list of k sweeps rule topk or batchtopk, not relu")

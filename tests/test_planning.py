"""`dictlab plan` and the disk check of `dictlab run`, on the embedded model and a small config."""

import re
import shutil
from collections import namedtuple

import pytest
import yaml

from dictlab import planning
from dictlab.cli import main
from dictlab.config import load_config


def small_config(tmp_path, name="small"):
    sae = {"method": "sae", "site": "L8.resid_post", "latents": [64], "k": 8, "steps": 20, "batch_size": 128}
    cfg = {"name": name, "model": "gemma3-270m", "corpus": {"source": "embedded"},
           "extract": {"layers": [4, 8], "train_tokens": 3000, "eval_tokens": 600, "model_dtype": "float32"},
           "fit": [{"method": "kmeans", "k": [4], "site": "L8.resid_post"}, sae, {**sae, "site": "L4.resid_post"}],
           "evaluate": {"ce_contexts": 2, "ce_batch_size": 1, "cluster_sample": 200},
           "interpret": {"n_top": 3, "per_interval": 1},
           "graph": {"dictionaries": ["L4.resid_post/sae-topk-n64-k8", "L8.resid_post/sae-topk-n64-k8"],
                     "min_r": 0.1, "min_count": 2},
           "steer": {"dictionary": "L4.resid_post/sae-topk-n64-k8", "n_units": 2, "alphas": [0.5, 1.0],
                     "contexts": 2, "new_tokens": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_predicts_every_stage_from_probes_scaled_to_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "PROBE_ROWS", 1024)  # the probe store is a third of the run's
    cfg = load_config(small_config(tmp_path))
    rows = planning.plan_run(cfg)
    assert [r.stage for r in rows] == ["extract", "fit kmeans [0]", "fit sae [1]", "fit sae [2]", "evaluate",
                                       "interpret", "graph", "steer"]
    assert all(r.basis and r.peak_ram_bytes > 0 for r in rows)
    # the store's bytes, measured on the probe store and scaled, agree with the bytes per row of its sites
    assert rows[0].disk_bytes == pytest.approx(planning.store_bytes(cfg, 640), rel=0.05)
    assert rows[1].disk_bytes > 4 * 640 * 4 and rows[2].disk_bytes > 2 * 64 * 640 * 4  # centres; SAE weights
    assert "x8" in rows[-1].basis  # steering: 2 units x 2 alphas x 2 contexts, from one of each
    small, large = map(int, re.search(r"all 3 dictionaries on (\d+) and (\d+) eval rows", rows[5].basis).groups())
    assert small < 0.6 * large  # interpret: timed at two eval sizes (whole contexts: near 300 and 600 rows)
    table = planning.format_plan(rows)
    assert table.splitlines()[-1].startswith("total") and "evaluate" in table
    assert not list(tmp_path.glob("runs*"))  # nothing written outside the temporary folder


def test_run_refuses_to_start_when_the_disk_cannot_hold_the_store(tmp_path, monkeypatch, capsys):
    path = small_config(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(path)]) == 2
    err = capsys.readouterr().err
    needed = planning.store_bytes(load_config(path), 640)
    assert f"needs {needed:,} more bytes" in err and "1,000 are free" in err and "--force" in err
    assert not (tmp_path / "runs" / "small" / "store").exists()
    line = planning.check_disk(load_config(path), tmp_path / "runs" / "small", force=True)
    assert f"{needed:,}" in line


def test_plan_refuses_a_bad_config_with_the_same_error_as_run(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nextract: {model_dtype: float8}\n")
    assert main(["plan", str(path)]) == 2
    plan_err = capsys.readouterr().err
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err == plan_err and "float8" in plan_err

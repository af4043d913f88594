"""The flagship preset's code path (Gemma 2, Pile-format data through the hub loader) end to end."""

import json

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from dictlab.cli import main
from dictlab.config import load_config


def test_gemma2_pile_preset_runs_end_to_end_and_resumes(tmp_path, pile_dir, capsys, make_tokenizer):
    # a randomly initialised Gemma 2 of reduced size, saved where the preset's hub id would be loaded from
    gemma2 = AutoConfig.for_model("gemma2", vocab_size=64, hidden_size=48, intermediate_size=96,
                                  num_hidden_layers=14, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(gemma2).save_pretrained(tmp_path / "gemma-2-2b")
    make_tokenizer(tmp_path / "gemma-2-2b")

    preset = yaml.safe_load(open("configs/gemma2-2b-pile.yaml"))
    assert preset["model"] == "google/gemma-2-2b" and preset["extract"]["layers"] == [12]
    assert preset["corpus"]["source"] == "hub:monology/pile-uncopyrighted"
    published = [e for e in preset["fit"] if e["method"] == "pretrained"]
    assert published and all("gemma-scope-2b-pt-res/layer_12/width_16k" in s for s in published[0]["sources"])
    preset["model"] = str(tmp_path / "gemma-2-2b")
    preset["corpus"]["source"] = f"hub:{pile_dir}"
    preset["corpus"]["eval_fraction"] = 0.2
    preset["extract"].update(train_tokens=800, eval_tokens=200, batch_size=4)
    preset["fit"] = [{"method": "kmeans", "k": [4, 8]}, {"method": "residual_kmeans", "k": [4], "stages": 2},
                     {"method": "gmm", "k": [3], "max_iter": 5}]
    assert preset.pop("graph")["dictionaries"] == [preset.pop("steer")["dictionary"]]  # the SAE fit above replaced
    config = tmp_path / "gemma2.yaml"
    config.write_text(yaml.safe_dump(preset))
    load_config(config)

    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "L12.resid_post" in out and "FVU" in out
    run = tmp_path / "runs" / "gemma2-2b-pile"
    results = json.loads((run / "results.json").read_text())["results"]
    rows = [(r["method"], r["decoding"], r["n_latents"]) for r in results]
    assert rows == [("kmeans", "centroid", 4), ("kmeans", "gain_shape", 4), ("kmeans", "centroid", 8),
                    ("kmeans", "gain_shape", 8), ("residual_kmeans", None, 8), ("gmm", "hard", 3), ("gmm", "soft", 3)]
    for r in results:
        # a random model's activations are nearly isotropic: little to explain, but all finite and sane
        assert 0 < r["fvu"] < 1.5 and 0 < r["cosine"] <= 1 and r["mse"] > 0
    assert [r["l0"] for r in results[:5]] == [1, 1, 1, 1, 2]
    assert all(r["loglik_per_token"] < 0 and r["bic"] > 0 for r in results[5:])
    # 95% intervals over held-out documents, from the same 1000 draws for every row
    for r in results:
        for key in ("fvu", "ce_recovered_vs_zero", "kl_spliced"):
            assert r[f"{key}_low"] <= r[key] <= r[f"{key}_high"] and len(r["draws"][key]) == 1000
        assert r["fvu_documents"] >= 2 and r["ce_recovered_vs_zero_documents"] >= 2
    inertia = [json.loads((run / "dictionaries" / "L12.resid_post" / f"kmeans-k{k}" / "config.json").read_text())
               ["config"]["inertia"] for k in (4, 8)]
    assert inertia[1] < inertia[0]  # on the training rows, more clusters fit better

    # every stage's wall time is recorded
    seconds = json.loads((run / "stage_seconds.json").read_text())
    assert set(seconds) == {"extract", "fit", "evaluate", "interpret", "graph", "steer", "report"}
    assert all(isinstance(s, float) for s in seconds.values())
    # a rerun skips every stage: no artifact is rewritten (but the log of the last run's stage times)
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "stage_seconds.json"}
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(config)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    # the separate commands work on the same run
    assert main(["--quiet", "store", "verify", str(run / "store")]) == 0
    dicts = [str(run / "dictionaries" / "L12.resid_post" / "kmeans-k4")]
    assert main(["--quiet", "evaluate", "--store", str(run / "store"), *dicts]) == 0
    assert "kmeans" in capsys.readouterr().out


def test_every_fit_method_through_the_cli(tmp_path, pile_dir, tiny_models, capsys, write_run_config):
    config = tmp_path / "c.yaml"
    write_run_config(config, "all", tiny_models["llama"], pile_dir)
    runs = str(tmp_path / "runs")
    assert main(["--quiet", "--runs-dir", runs, "extract", str(config)]) == 0
    for method in ("kmeans", "spherical_kmeans", "minibatch_kmeans", "residual_kmeans", "gmm", "mppca"):
        assert main(["--quiet", "--runs-dir", runs, "fit", str(config), "--method", method, "--k", "3",
                     "--max-iter", "5"]) == 0
    folders = sorted((tmp_path / "runs" / "all" / "dictionaries" / "L1.resid_post").iterdir())
    assert [f.name for f in folders] == ["gmm-diag-k3", "kmeans-k3", "minibatch_kmeans-k3", "mppca-q4-k3",
                                         "residual_kmeans-L2-k3", "spherical_kmeans-k3"]
    out = tmp_path / "results.json"
    assert main(["--quiet", "evaluate", "--store", str(tmp_path / "runs" / "all" / "store"),
                 *map(str, folders), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 10  # every method, once per decoding
    for r in results:
        assert 0 < r["fvu"] < 1.5 and r["mse"] > 0 and r["l0"] >= 1


def test_saes_and_a_transcoder_from_yaml(tmp_path, pile_dir, tiny_models, capsys, write_run_config):
    config = tmp_path / "c.yaml"
    sae = {"method": "sae", "latents": [16], "k": 2, "steps": 200, "batch_size": 64, "lr": 3e-3, "warmup_steps": 5}
    write_run_config(config, "sae", tiny_models["gemma2"], pile_dir, sites=["resid_mid", "mlp_out"],
                     fit=[{**sae, "site": "L1.mlp_out"}, {**sae, "rule": "jumprelu", "site": "L1.mlp_out"},
                          {**sae, "rule": "batchtopk", "matryoshka": [4], "site": "L1.mlp_out"},
                          {**sae, "site": "L1.resid_mid", "target_site": "L1.mlp_out"}])
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(config)]) == 0
    results = json.loads((tmp_path / "runs" / "sae" / "results.json").read_text())["results"]
    assert [r["method"] for r in results] == ["sae-topk", "sae-jumprelu", "sae-batchtopk-matryoshka", "transcoder-topk"]
    assert results[0]["l0"] == 2 and results[3]["target_site"] == "L1.mlp_out"
    for r in results:
        assert 0 < r["fvu"] < 1.5 and r["n_latents"] == 16
    meta = json.loads((tmp_path / "runs" / "sae" / "dictionaries" / "L1.mlp_out" / "sae-topk-n16-k2" /
                       "config.json").read_text())
    assert meta["training"][-1]["step"] == 199 and "mse" in meta["training"][-1]
    # the same metrics went to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "runs" / "sae" / "tensorboard" / "L1.mlp_out" / "sae-topk-n16-k2"
    events = EventAccumulator(str(logs)).Reload()
    mse = events.Scalars("train/mse")
    assert [e.step for e in mse] == [0, 100, 199]
    assert mse[-1].value == pytest.approx(meta["training"][-1]["mse"], rel=1e-6)
    assert {"train/l0", "train/lr", "train/dead_fraction", "train/aux"} <= set(events.Tags()["scalars"])
    config.write_text(config.read_text().replace("L1.resid_mid\n", "L1.resid_pre\n"))
    capsys.readouterr()
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs2"), "run", str(config)]) == 2
    assert "site 'L1.resid_pre' is not in the store" in capsys.readouterr().err


def test_quick_test_and_eval_only(tmp_path, pile_dir, tiny_models, capsys, write_run_config):
    config = tmp_path / "c.yaml"
    write_run_config(config, "q", tiny_models["llama"], pile_dir, train_tokens=1200,
                     fit=[{"method": "kmeans", "k": [3]}, {"method": "sae", "latents": [16], "k": 2, "steps": 5000}])
    runs = str(tmp_path / "runs")
    assert main(["--quiet", "--runs-dir", runs, "extract", str(config)]) == 0
    capsys.readouterr()
    assert main(["--quiet", "--runs-dir", runs, "fit", str(config), "--eval-only"]) == 2
    assert "was not fitted with these settings" in capsys.readouterr().err
    assert main(["--quiet", "--runs-dir", runs, "fit", str(config), "--quick-test"]) == 0
    assert "sae-topk" in capsys.readouterr().out
    quick = tmp_path / "runs" / "q" / "dictionaries-quick" / "L1.resid_post"
    meta = json.loads((quick / "sae-topk-n16-k2" / "config.json").read_text())
    assert meta["training"][-1]["step"] == 199 and meta["inputs"]["fit"]["batch_size"] == 1024
    assert json.loads((quick / "kmeans-k3" / "config.json").read_text())["config"]["max_iter"] == 5
    assert not (tmp_path / "runs" / "q" / "dictionaries").exists()
    assert main(["--quiet", "--runs-dir", runs, "fit", str(config), "--quick-test", "--eval-only"]) == 2


def test_an_sae_sweep_from_yaml_trains_on_one_stream(tmp_path, pile_dir, tiny_models, monkeypatch, capsys,
                                                     write_run_config):
    import dictlab.dictionaries.sae_fit as sae_fit

    streams = []
    real = sae_fit.sae_batches
    monkeypatch.setattr(sae_fit, "sae_batches", lambda *a, **kw: streams.append(1) or real(*a, **kw))
    config = tmp_path / "c.yaml"
    common = {"method": "sae", "steps": 30, "batch_size": 64, "lr": 3e-3, "warmup_steps": 5}
    write_run_config(config, "sweep", tiny_models["llama"], pile_dir, train_tokens=1200,
                     fit=[{**common, "latents": [16, 32], "k": [2, 4]},
                          {**common, "rule": "relu", "latents": [16], "l1_coeff": [0.01, 0.1]}])
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(config)]) == 0
    assert len(streams) == 2  # one stream of batches per entry, shared by its members
    results = json.loads((tmp_path / "runs" / "sweep" / "results.json").read_text())["results"]
    names = [r["dictionary"].rsplit("/", 1)[1] for r in results]
    assert names == ["sae-topk-n16-k2", "sae-topk-n16-k4", "sae-topk-n32-k2", "sae-topk-n32-k4",
                     "sae-relu-n16-l1_0.01", "sae-relu-n16-l1_0.1"]
    assert [r["l0"] for r in results[:4]] == [2, 4, 2, 4]
    assert results[4]["l0"] > results[5]["l0"]  # the larger L1 penalty leaves fewer latents active

    config.write_text(config.read_text().replace("rule: relu", "rule: jumprelu"))
    capsys.readouterr()
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs2"), "run", str(config)]) == 2
    assert "a list of l1_coeff sweeps rule relu, not jumprelu" in capsys.readouterr().err


def test_published_saes_join_the_comparison_and_an_unreachable_one_is_skipped(tmp_path, pile_dir, tiny_models,
                                                                              capsys, caplog, write_run_config):
    import numpy as np

    g = np.random.default_rng(0)
    params = {"W_enc": g.normal(size=(32, 48)) * 0.2, "W_dec": g.normal(size=(48, 32)) * 0.2,
              "b_enc": np.zeros(48), "b_dec": np.zeros(32), "threshold": np.full(48, 0.05)}
    folder = tmp_path / "gemma-scope-like" / "layer_1" / "width_48" / "average_l0_9"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    config = tmp_path / "c.yaml"
    hub = "hub:google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"  # no hub here: skipped, warned
    write_run_config(config, "pre", tiny_models["llama"], pile_dir,
                     fit=[{"method": "kmeans", "k": [3]},
                          {"method": "pretrained", "site": "L1.resid_post", "sources": [str(folder), hub]}])
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(config)]) == 0
    assert "skipping pretrained SAE hub:google/gemma-scope-2b-pt-res" in caplog.text
    results = json.loads((tmp_path / "runs" / "pre" / "results.json").read_text())["results"]
    imported = [r for r in results if r["method"] == "sae-jumprelu"]
    assert len(imported) == 1 and imported[0]["dictionary"].endswith("pretrained-layer_1-width_48-average_l0_9")
    assert imported[0]["n_latents"] == 48 and 0 < imported[0]["fvu"] and "ce_recovered_vs_zero" in imported[0]
    # required: the same unreachable source fails the run, naming it
    config.write_text(config.read_text().replace("method: pretrained", "method: pretrained\n  required: true"))
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs2"), "run", str(config)]) == 2
    assert "could not download layer_12/width_16k/average_l0_82/params.npz" in capsys.readouterr().err


def test_run_quick_is_the_same_run_made_small(tmp_path, pile_dir, tiny_models, write_run_config):
    config = tmp_path / "c.yaml"
    write_run_config(config, "small", tiny_models["gpt2"], pile_dir, train_tokens=1200,
                     fit=[{"method": "kmeans", "k": [2, 3, 4], "max_iter": 50},
                          {"method": "sae", "latents": [8, 16, 32], "k": 2, "steps": 500, "batch_size": 64}])
    assert main(["--quiet", "--runs-dir", str(tmp_path / "runs"), "run", str(config), "--quick"]) == 0
    run = tmp_path / "runs" / "small-quick"
    assert (run / "report.html").exists() and not (tmp_path / "runs" / "small").exists()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["fit"][0]["k"] == [2, 3] and cfg["fit"][0]["max_iter"] == 10
    assert cfg["fit"][1]["latents"] == [8, 16] and cfg["fit"][1]["steps"] == 40
    assert cfg["evaluate"]["ce_contexts"] == 2 and cfg["interpret"]["n_top"] == 5
    results = json.loads((run / "results.json").read_text())["results"]
    assert len(results) == 2 * 2 + 2


def test_two_entries_writing_one_folder_are_refused_until_one_is_named(tmp_path):
    from types import SimpleNamespace

    from dictlab.dictionaries import SAEFit
    from dictlab.dictionaries.fitting import fit_dictionaries
    from dictlab.errors import DictlabError

    store = SimpleNamespace(sites={"L1.resid_post": 32})  # refused before anything is read
    a = SAEFit(rule="jumprelu", latents=[16], jumprelu_init=0.25, site="L1.resid_post")
    b = SAEFit(rule="jumprelu", latents=[16], jumprelu_init=1.0, site="L1.resid_post")
    with pytest.raises(DictlabError, match=r"fit entries 0 and 1 \(counting from 0\) both write "
                                           r"L1.resid_post/sae-jumprelu-n16: give one of them a `name:`"):
        fit_dictionaries(store, [a, b], tmp_path)
    named = b.model_copy(update={"name": "init1"})
    assert named.folder_name(named.sizes()[0]) == "sae-jumprelu-n16-init1"


def test_interpretation_is_reused_until_its_settings_change_and_can_be_turned_off(tmp_path, pile_dir, tiny_models,
                                                                                  write_run_config):
    config = tmp_path / "c.yaml"
    write_run_config(config, "interp", tiny_models["gpt2"], pile_dir, train_tokens=800,
                     fit=[{"method": "kmeans", "k": [2, 4]}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    run = runs / "interp"
    per_dictionary = sorted(run.glob("dictionaries/*/*/interpretation.json"))
    assert len(per_dictionary) == 2 and (run / "units.html").exists()
    stamps = [p.stat().st_mtime_ns for p in [*per_dictionary, run / "interpretation.json"]]
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0  # nothing changed: reused
    assert [p.stat().st_mtime_ns for p in [*per_dictionary, run / "interpretation.json"]] == stamps
    config.write_text(config.read_text() + "interpret:\n  n_top: 2\n  splitting: false\n")
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    data = json.loads((run / "interpretation.json").read_text())
    assert data["splitting"] == [] and data["inputs"]["config"]["n_top"] == 2
    for path in per_dictionary:
        assert all(len(u["top"]) <= 2 for u in json.loads(path.read_text())["units"])
    off = tmp_path / "off.yaml"
    write_run_config(off, "off", tiny_models["gpt2"], pile_dir, train_tokens=800, fit=[{"method": "kmeans", "k": [2]}])
    off.write_text(off.read_text() + "interpret:\n  enabled: false\n")
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(off)]) == 0
    assert (runs / "off" / "report.html").exists() and not (runs / "off" / "interpretation.json").exists()
    assert "Interpretability" not in (runs / "off" / "report.html").read_text()

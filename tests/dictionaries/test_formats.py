"""Formats: every rule round-trips through each format that can hold it (codes and reconstructions to 1e-5);
files written by SAELens and sparsify themselves read as their own code encodes and decodes them, and
dictlab's exports load in their loaders with the same numbers; bad files give one-line errors and nothing
is written on failure."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dictlab.data.io import atomic_folder
from dictlab.dictionaries.formats import export, load_sae, read_gemma_scope, read_saelens, read_sparsify
from dictlab.dictionaries.formats.saelens import write_saelens
from dictlab.dictionaries.formats.sparsify import write_sparsify
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

D, L = 12, 24


def inputs(n: int = 60, d: int = D, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 5 + 2


def trained_like(sae: SparseAutoencoder, seed: int = 0) -> SparseAutoencoder:
    """An SAE whose every tensor is set (an input scale ≠ 1, biases, thresholds, gates, skip weights)."""
    g = torch.Generator().manual_seed(seed)
    x = inputs(200, sae.d_in, seed + 7)
    sae.initialize_from_data(x, x[:, :sae.d_model] * 0.5 if sae.d_model != sae.d_in else None)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(sae.n_latents, generator=g) * 0.3)
        for name in ("W_skip", "b_gate", "r_mag"):
            if getattr(sae, name) is not None:
                getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.2)
        pre = sae.pre_activations(x)
        sae.log_threshold.copy_(pre.quantile(0.7, dim=0).clamp_min(1e-3).log())
        sae.batch_threshold.fill_(float(pre.relu().quantile(0.8)))
    return sae


def assert_same_numbers(a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor) -> None:
    torch.testing.assert_close(b.encode(x), a.encode(x), rtol=1e-5, atol=1e-5)
    ra, rb = (d.reconstruct(x, *d.encode_sparse(x)) for d in (a, b))
    torch.testing.assert_close(rb, ra, rtol=1e-5, atol=1e-5)


# --- round trips through dictlab's own readers and writers ---------------------------------------
SAELENS_CASES = {
    "relu": dict(rule="relu"), "topk": dict(rule="topk", k=4), "batchtopk": dict(rule="batchtopk", k=4),
    "jumprelu": dict(rule="jumprelu"), "matryoshka-topk": dict(rule="topk", k=4, matryoshka=[6, 12]),
    "matryoshka-batchtopk": dict(rule="batchtopk", k=4, matryoshka=[6]), "gated": dict(rule="gated"),
    "transcoder": dict(rule="relu", d_out=8), "jumprelu-transcoder": dict(rule="jumprelu", d_out=8),
    "skip-transcoder": dict(rule="relu", d_out=8, skip=True),
    "layer-norm": dict(rule="relu", normalize="layer_norm"),
    "constant-norm": dict(rule="topk", k=3, normalize="constant_norm_rescale"),
}
SPARSIFY_CASES = {
    "topk": dict(rule="topk", k=4), "groupmax": dict(rule="groupmax", k=4),
    "matryoshka-topk": dict(rule="topk", k=4, matryoshka=[8]),
    "transcoder": dict(rule="topk", k=3, transcoder=True), "skip": dict(rule="topk", k=3, skip=True),
    "skip-transcoder": dict(rule="topk", k=3, transcoder=True, skip=True),
}


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_every_rule_round_trips_through_saelens(case, tmp_path):
    sae = trained_like(SparseAutoencoder(D, L, **SAELENS_CASES[case]))
    write_saelens(sae, tmp_path)
    back = read_saelens(tmp_path)
    assert back.hparams["rule"] == ("jumprelu" if sae.hparams["rule"] == "batchtopk" else sae.hparams["rule"])
    assert_same_numbers(sae, back, inputs())


@pytest.mark.parametrize("case", SPARSIFY_CASES)
def test_every_top_k_rule_round_trips_through_sparsify(case, tmp_path):
    sae = trained_like(SparseAutoencoder(D, L, **SPARSIFY_CASES[case]))
    write_sparsify(sae, tmp_path)
    back = read_sparsify(tmp_path)
    assert back.hparams["rule"] == sae.hparams["rule"] and back.hparams["transcoder"] == sae.hparams["transcoder"]
    assert_same_numbers(sae, back, inputs())


def test_a_batchtopk_threshold_exports_as_every_latents_jumprelu_threshold(tmp_path):
    sae = trained_like(SparseAutoencoder(D, L, rule="batchtopk", k=4))
    write_saelens(sae, tmp_path)
    threshold = load_file(str(tmp_path / "sae_weights.safetensors"))["threshold"]
    assert torch.equal(threshold, torch.full((L,), float(sae.batch_threshold)))
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert sae.target_l0 == 4 and read_saelens(tmp_path).target_l0 is None


def test_formats_that_cannot_hold_a_dictionary_say_which_can(tmp_path):
    with pytest.raises(DictlabError, match="sparsify holds top-k and group-max coders, not jumprelu; write this SAE "
                                           "as saelens"):
        write_sparsify(SparseAutoencoder(D, L, rule="jumprelu"), tmp_path)
    with pytest.raises(DictlabError, match="the SAELens format holds no groupmax rule; write this SAE as sparsify"):
        write_saelens(SparseAutoencoder(D, L, rule="groupmax", k=4), tmp_path)
    with pytest.raises(DictlabError, match="maps 12 to 8: keep it as a dictlab folder"):
        write_sparsify(SparseAutoencoder(D, L, rule="topk", k=2, d_out=8), tmp_path)
    from dictlab.dictionaries.kmeans import KMeans

    km = KMeans(3, max_iter=2)
    km.fit(inputs(), progress=False)
    km.save(tmp_path / "km")
    with pytest.raises(DictlabError, match="holds a kmeans dictionary; the saelens format holds SAEs and transcoders "
                                           "only. A dictionary of any kind exports to neuronpedia"):
        export(tmp_path / "km", "saelens", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_only_rules_are_refused_in_training():
    sae = SparseAutoencoder(D, L, rule="gated")
    with pytest.raises(DictlabError, match="evaluates it but does not train it"):
        sae.loss(inputs())
    with pytest.raises(DictlabError, match="k must divide them"):
        SparseAutoencoder(D, 10, rule="groupmax", k=4)


def test_the_input_normalisations_match_saelens_by_hand_in_float64():
    x = inputs()
    sae = trained_like(SparseAutoencoder(D, L, rule="relu", normalize="layer_norm"))
    w = {n: t.double() for n, t in sae.state_dict().items()}
    x64 = x.double()
    mu, sd = x64.mean(1, keepdim=True), (x64 - x64.mean(1, keepdim=True)).std(1, keepdim=True)
    codes = torch.relu(((x64 - mu) / (sd + 1e-5) * w["input_scale"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x).double(), codes, rtol=1e-5, atol=1e-5)
    out = ((codes @ w["W_dec"] + w["b_dec"]) / w["input_scale"]) * sd + mu
    torch.testing.assert_close(sae.reconstruct(x, *sae.encode_sparse(x)).double(), out, rtol=1e-5, atol=1e-5)


# --- detection, sparsify roots, bad input --------------------------------------------------------
def test_load_sae_tells_each_format_from_its_files(tmp_path, monkeypatch):
    sae = trained_like(SparseAutoencoder(D, L, rule="topk", k=3))
    sae.save(tmp_path / "ours")
    (tmp_path / "saelens").mkdir()
    write_saelens(sae, tmp_path / "saelens", hook_name="blocks.3.hook_resid_post")
    for hook in ("layers.2", "layers.10"):
        (tmp_path / "root" / hook).mkdir(parents=True)
        write_sparsify(sae, tmp_path / "root" / hook)
    x = inputs()
    for where in ("ours", "saelens", "root/layers.2"):
        assert_same_numbers(sae, load_sae(tmp_path / where), x)
    assert_same_numbers(sae, load_sae(tmp_path / "root", hookpoint="layers.10"), x)
    with pytest.raises(DictlabError, match=r"checkpoint root holding 2 hookpoints \(layers.10, layers.2\); name one"):
        load_sae(tmp_path / "root")
    with pytest.raises(DictlabError, match="hookpoint 'layers.7' is not in .*; it holds: layers.10, layers.2"):
        load_sae(tmp_path / "root", hookpoint="layers.7")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictlabError, match=r"no SAE found at .*empty: looked for a dictlab folder .*SAELens folder "
                                           r"\(cfg.json \+ sae_weights.safetensors\), a sparsify folder"):
        load_sae(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DictlabError, match="could not download layer_12/width_16k/average_l0_82/params.npz"):
        load_sae("hub:google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")


def _sparsify_folder(path, cfg: dict | None = None, **tensors):
    path.mkdir(parents=True, exist_ok=True)
    base = {"encoder.weight": torch.randn(L, D), "encoder.bias": torch.randn(L), "W_dec": torch.randn(L, D),
            "b_dec": torch.randn(D)}
    save_file({**base, **tensors}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": L, "k": 4, "d_in": D,
                                               **(cfg or {})}))
    return path


@pytest.mark.parametrize("cfg, tensors, message", [
    ({}, {"W_dec": torch.randn(L, D + 1)}, r"sae.safetensors: tensors of the wrong shape \(found, expected\): "
                                           r"\{'W_dec': \(\(24, 13\), \(24, 12\)\)\}"),
    ({"d_in": None}, {}, "cfg.json: field 'd_in' is missing"),
    ({"k": "four"}, {}, "cfg.json: field 'k' is 'four'; expected int"),
    ({"activation": "relu"}, {}, "cfg.json: activation 'relu' is not supported; accepted: topk, groupmax"),
    ({}, {"b_dec": torch.arange(D)}, "sae.safetensors: tensor b_dec has dtype torch.int64; expected a float dtype"),
    ({}, {"encoder.bias": torch.full((L,), float("nan"))}, "sae.safetensors: tensor encoder.bias holds NaN or Inf"),
    ({"skip_connection": True}, {}, r"sae.safetensors: missing tensors \['W_skip'\]"),
])
def test_bad_sparsify_files_give_one_line_errors(tmp_path, cfg, tensors, message):
    _sparsify_folder(tmp_path / "sp", cfg, **tensors)
    with pytest.raises(DictlabError, match=message):
        load_sae(tmp_path / "sp")


def test_bad_saelens_and_gemma_scope_files_give_one_line_errors(tmp_path):
    folder = tmp_path / "sl"
    folder.mkdir()
    (folder / "cfg.json").write_text('{"architecture": "clt", "d_in": 4, "d_sae": 8}')
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(DictlabError, match="architecture 'clt' is not supported; accepted: standard, relu, topk"):
        read_saelens(folder)
    (folder / "cfg.json").write_text('{"architecture": "standard", "d_in": 4, "d_sae": 8}')
    with pytest.raises(DictlabError, match="not a readable safetensors file"):
        read_saelens(folder)
    (folder / "cfg.json").write_text('{"architecture": "standard", "d_in": 4, "d_sae": 8, '
                                     '"normalize_activations": "covariance_whitening"}')
    with pytest.raises(DictlabError, match="normalize_activations 'covariance_whitening' is not supported; accepted: "
                                           "none, constant_norm_rescale, layer_norm, expected_average_only_in"):
        read_saelens(folder)
    (folder / "cfg.json").write_text('{"architecture": "topk", "d_in": 4, "d_sae": 8}')
    with pytest.raises(DictlabError, match="field 'k' is missing"):
        read_saelens(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(DictlabError, match="cfg.json: not a readable JSON file"):
        read_saelens(folder)
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 5), np.float32),
             b_enc=np.zeros(8, np.float32), b_dec=np.zeros(4, np.float32))
    with pytest.raises(DictlabError, match=r"missing tensors \['threshold'\]"):
        read_gemma_scope(tmp_path)
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 5), np.float32),
             b_enc=np.zeros(8, np.float32), b_dec=np.zeros(4, np.float32), threshold=np.zeros(8, np.float32))
    with pytest.raises(DictlabError, match=r"W_dec.*\(8, 5\), \(8, 4\)"):
        read_gemma_scope(tmp_path)


def test_gemma_scope_params_npz_matches_the_jumprelu_forward_by_hand(tmp_path):
    g = np.random.default_rng(0)
    p = {"W_enc": g.normal(size=(16, 32)), "W_dec": g.normal(size=(32, 16)), "b_enc": g.normal(size=32) * 0.1,
         "b_dec": g.normal(size=16), "threshold": np.abs(g.normal(size=32))}
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in p.items()})
    sae = read_gemma_scope(tmp_path)
    x = g.normal(size=(20, 16)).astype(np.float32)
    pre = x @ p["W_enc"] + p["b_enc"]
    expected = (np.maximum(pre, 0) * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]
    np.testing.assert_allclose(sae.decode(sae.encode(torch.from_numpy(x))).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_a_failed_export_leaves_its_folder_as_it_was(tmp_path):
    sae = trained_like(SparseAutoencoder(D, L, rule="jumprelu"))
    sae.save(tmp_path / "d")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DictlabError, match="out already exists and is not empty"):
        export(tmp_path / "d", "saelens", tmp_path / "out")
    with pytest.raises(DictlabError, match="not jumprelu"):
        export(tmp_path / "d", "sparsify", tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "new") as tmp:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))
    export(tmp_path / "d", "saelens", tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


# --- the commands, on a small run ----------------------------------------------------------------
def test_export_and_import_commands_on_a_run(tmp_path, pile_dir, tiny_models, write_run_config, capsys):
    """`dictlab export` writes Neuronpedia batches (valid against the schema written from SAEDashboard's
    runner output) for clusters and latents, and SAELens folders with sparsity.safetensors; `dictlab import`
    brings them back as dictlab folders with the same numbers."""
    from pathlib import Path

    import jsonschema

    from dictlab.cli import main
    from dictlab.data.store import Store

    config = write_run_config(tmp_path / "c.yaml", "f", tiny_models["llama"], pile_dir, train_tokens=1200,
                              fit=[{"method": "kmeans", "k": [3]},
                                   {"method": "sae", "latents": [16], "k": 2, "steps": 30, "batch_size": 64,
                                    "lr": 3e-3, "warmup_steps": 3}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "extract", str(config)]) == 0
    assert main(["--quiet", "--runs-dir", str(runs), "fit", str(config)]) == 0
    kmeans, sae = sorted((runs / "f" / "dictionaries" / "L1.resid_post").iterdir())
    out = tmp_path / "exports"
    assert main(["export", str(sae), "--to", "neuronpedia", str(out / "np")]) == 2
    assert "interpretation.json is missing" in capsys.readouterr().err and not (out / "np").exists()
    assert main(["--quiet", "interpret", "--store", str(runs / "f" / "store"), "--n-top", "3", str(kmeans),
                 str(sae)]) == 0
    schema = json.loads((Path(__file__).parent / "neuronpedia_batch.schema.json").read_text())
    for folder, units in ((kmeans, 3), (sae, 16)):
        target = out / f"np-{folder.name}"
        assert main(["export", str(folder), "--to", "neuronpedia", str(target), "--features-per-batch", "5"]) == 0
        batches = sorted(target.iterdir(), key=lambda p: int(p.stem.split("-")[1]))
        assert [p.name for p in batches] == [f"batch-{i}.json" for i in range(-(-units // 5))]
        features = []
        for path in batches:
            batch = json.loads(path.read_text())
            jsonschema.validate(batch, schema)
            assert batch["layer"] == 1 and batch["sae_set"] == folder.name and batch["model_id"]
            features += batch["features"]
        interpretation = json.loads((folder / "interpretation.json").read_text())
        assert [f["feature_index"] for f in features] == list(range(units))
        for f, unit in zip(features, interpretation["units"]):
            assert f["frac_nonzero"] == unit["frequency"] and f["freq_hist_data_bar_heights"] == unit["histogram"]
            assert f["pos_str"] == [t for t, _ in unit["logit_lens"]["top"]]
            top = [a for a in f["activations"] if a["bin_min"] == -1]
            assert [a["tokens"] for a in top] == [e["tokens"] for e in unit["top"]]
            if folder == sae and unit["frequency"] > 0:
                shares = {a["bin_min"]: a["bin_contains"] for a in f["activations"] if a["bin_min"] != -1}
                assert all(0 <= s <= 1 for s in shares.values())
    assert main(["export", str(sae), "--to", "saelens", str(out / "sl")]) == 0
    frequency = torch.tensor([u["frequency"] for u in json.loads((sae / "interpretation.json").read_text())["units"]])
    sparsity = load_file(str(out / "sl" / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(frequency.double() + 1e-10).float())
    assert main(["import", str(out / "sl"), str(out / "back"), "--site", "L1.resid_post"]) == 0
    assert "imported sae-topk (topk, 16 latents, 32 -> 32)" in capsys.readouterr().out
    from dictlab.data.io import sha256_file

    imported = json.loads((out / "back" / "config.json").read_text())
    assert imported["source_sha256"] == sha256_file(out / "sl" / "sae_weights.safetensors")
    x = Store(runs / "f" / "store").load("L1.resid_post", "eval")
    assert_same_numbers(load_sae(sae), load_sae(out / "back"), x)
    assert main(["import", str(out / "sl"), str(out / "back")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    for hook in ("layers.1", "layers.0"):
        assert main(["export", str(sae), "--to", "sparsify", str(out / "root" / hook)]) == 0
    capsys.readouterr()
    assert main(["import", str(out / "root"), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["layers.0", "layers.1"]
    assert main(["import", str(out / "root"), str(out / "one")]) == 2
    assert "holding 2 hookpoints (layers.0, layers.1); name one (--hookpoint)" in capsys.readouterr().err
    assert main(["import", str(out / "root"), str(out / "one"), "--hookpoint", "layers.1"]) == 0
    assert_same_numbers(load_sae(sae), load_sae(out / "one"), x)

"""torch.distributed on CPU (gloo, 2 processes): data-parallel fits equal single-process ones."""

import pytest
import torch

from dictlab.data.distributed import RankSource, rank_slice
from dictlab.dictionaries import GaussianMixture, KMeans, LinearBasis, MixturePPCA, ResidualKMeans, fit_many
from dictlab.dictionaries.sampling import as_source, row_keys, scan


def blobs(n=3000, d=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 6 + 20
    return centres[torch.randint(k, (n,), generator=g)] + torch.randn(n, d, generator=g)


def _mine(x, world, batch=256):
    return RankSource(as_source(x[rank_slice(len(x), world)], batch), world)


def test_row_keys_depend_on_the_row_alone():
    x = blobs(500)
    keys = row_keys(x, seed=3)
    perm = torch.randperm(500)
    assert torch.equal(row_keys(x[perm], 3), keys[perm])
    assert torch.equal(torch.cat([row_keys(p, 3) for p in x.split(77)]), keys)
    assert not torch.equal(row_keys(x, 4), keys)
    assert 0 <= float(keys.min()) and float(keys.max()) < 1
    assert abs(float(keys.mean()) - 0.5) < 0.05  # near-uniform


def test_scan_sample_is_independent_of_batching():
    x = blobs(2000)
    a, n, _ = scan(as_source(x, 64), 300, seed=1)
    b, _, _ = scan(as_source(x[torch.randperm(2000)], 500), 300, seed=1)
    assert n == 2000 and torch.equal(a, b)


def _fit_kmeans(world, x, out):
    models = fit_many([KMeans(4, seed=2, init_sample=500), KMeans(7, n_init=2, seed=1, init_sample=500)],
                      _mine(x, world), progress=False)
    sample, rows, _ = scan(_mine(x, world), 400, seed=5)
    gmm = GaussianMixture(5, max_iter=20, seed=0, init_sample=500).fit(_mine(x, world), progress=False)
    ppca = MixturePPCA(3, q=2, max_iter=10, seed=0, init_sample=500).fit(_mine(x, world), progress=False)
    res = ResidualKMeans(3, stages=2, max_iter=20, init_sample=500).fit(_mine(x, world), progress=False)
    pca = LinearBasis("pca", 3).fit(_mine(x, world), progress=False)
    if world.main:
        torch.save({"centres": [m.centers for m in models], "inertia": [m.inertia_ for m in models],
                    "iters": [m.n_iter_ for m in models], "sample": sample, "rows": rows,
                    "gmm": gmm.tensors(), "gmm_ll": gmm.log_likelihood_history_, "ppca": ppca.tensors(),
                    "res": res.directions, "pca": pca.tensors()}, out)


def test_distributed_kmeans_and_em_equal_one_process(tmp_path, on_ranks):
    x = blobs()
    on_ranks(_fit_kmeans, tmp_path, x, tmp_path / "ranks.pt")
    got = torch.load(tmp_path / "ranks.pt", weights_only=True)
    one = fit_many([KMeans(4, seed=2, init_sample=500), KMeans(7, n_init=2, seed=1, init_sample=500)],
                   as_source(x, 256), progress=False)
    sample, rows, _ = scan(as_source(x, 256), 400, seed=5)
    assert got["rows"] == rows == len(x) and torch.equal(got["sample"], sample)
    for m, centres, inertia, iters in zip(one, got["centres"], got["inertia"], got["iters"]):
        torch.testing.assert_close(centres, m.centers, rtol=0, atol=1e-4)
        assert inertia == pytest.approx(m.inertia_, rel=1e-6) and iters == m.n_iter_
    gmm = GaussianMixture(5, max_iter=20, seed=0, init_sample=500).fit(as_source(x, 256), progress=False)
    assert got["gmm_ll"] == pytest.approx(gmm.log_likelihood_history_, rel=1e-6)
    for name, t in gmm.tensors().items():
        torch.testing.assert_close(got["gmm"][name], t, rtol=1e-4, atol=1e-4)
    ppca = MixturePPCA(3, q=2, max_iter=10, seed=0, init_sample=500).fit(as_source(x, 256), progress=False)
    for name, t in ppca.tensors().items():
        torch.testing.assert_close(got["ppca"][name], t, rtol=1e-3, atol=1e-3)
    res = ResidualKMeans(3, stages=2, max_iter=20, init_sample=500).fit(as_source(x, 256), progress=False)
    torch.testing.assert_close(got["res"], res.directions, rtol=0, atol=1e-4)
    pca = LinearBasis("pca", 3).fit(as_source(x, 256), progress=False)
    torch.testing.assert_close(got["pca"]["mean"], pca.mean_, rtol=0, atol=1e-3)
    torch.testing.assert_close(got["pca"]["variances"], pca.variances_, rtol=1e-5, atol=0)
    torch.testing.assert_close(got["pca"]["basis"].abs(), pca.basis_.abs(), rtol=0, atol=1e-4)  # up to sign


def sae_data(n=4096, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(48, d, generator=g)
    codes = torch.rand(n, 48, generator=g) * (torch.rand(n, 48, generator=g) < 0.08)
    return codes @ atoms + 0.05 * torch.randn(n, d, generator=g)


SAE_KINDS = [dict(rule="topk", k=4, dead_tokens=256, aux_k=8, n_latents=256),
             dict(rule="batchtopk", k=6, dead_tokens=256),
             dict(rule="jumprelu", l0_coeff=1e-2, bandwidth=0.05, jumprelu_init=0.05),
             dict(rule="relu", l1_coeff=1e-2, matryoshka=[8, 16])]
TRAIN = dict(steps=40, lr=3e-3, warmup_steps=5, sparsity_warmup_steps=5)


def _saes():
    from dictlab.dictionaries.sae import SparseAutoencoder

    return [SparseAutoencoder(16, seed=i, **{"n_latents": 32, **kw}) for i, kw in enumerate(SAE_KINDS)]


def _my_part(batches, world, global_batch):
    return lambda start: (b[rank_slice(global_batch, world)] for b in batches(start))


class _Stop(Exception):
    pass


def _stop_at(batches, step):
    def from_step(start):
        for i, b in enumerate(batches(start), start):
            if i == step:
                raise _Stop
            yield b

    return from_step


def _train_on_ranks(world, x, out, checkpoint):
    from dictlab.dictionaries.train import TrainConfig, tensor_batches, train_sweep

    mine = _my_part(tensor_batches(x, 256, seed=1), world, 256)
    saes = _saes()
    histories = train_sweep(saes, mine, TrainConfig(**TRAIN), progress=False, log_every=10, world=world)
    resumed = _saes()
    try:  # interrupted at step 25 (after a checkpoint at 20), then started again
        train_sweep(resumed, _stop_at(mine, 25), TrainConfig(**TRAIN), progress=False, checkpoint=checkpoint,
                    checkpoint_every=10, world=world)
    except _Stop:
        assert checkpoint.exists()
    train_sweep(resumed, mine, TrainConfig(**TRAIN), progress=False, checkpoint=checkpoint, checkpoint_every=10,
                world=world)
    torch.save({"saes": [s.state_dict() for s in saes], "resumed": [s.state_dict() for s in resumed],
                "histories": histories}, out / f"rank{world.rank}.pt")  # every rank's copy, compared below


def _train_sharded(world, x, out, checkpoint):
    from dictlab.dictionaries.sae_sharding import shard_latents, unshard_latents
    from dictlab.dictionaries.train import TrainConfig, tensor_batches, train_sweep

    def sharded():
        return [shard_latents(s, world) for s in _saes()]

    batches = tensor_batches(x, 256, seed=1)  # every rank takes whole batches
    saes = sharded()
    assert saes[0].W_dec.shape[0] == 128  # half of the 256 latents
    histories = train_sweep(saes, batches, TrainConfig(**TRAIN), progress=False, log_every=10)
    resumed = sharded()
    try:
        train_sweep(resumed, _stop_at(batches, 25), TrainConfig(**TRAIN), progress=False, checkpoint=checkpoint,
                    checkpoint_every=10)
    except _Stop:
        assert checkpoint.with_name(f"{checkpoint.name}.rank{world.rank}-of-2").exists()
    resumed = sharded()
    train_sweep(resumed, batches, TrainConfig(**TRAIN), progress=False, checkpoint=checkpoint, checkpoint_every=10)
    whole = [unshard_latents(s).state_dict() for s in saes]
    again = [unshard_latents(s).state_dict() for s in resumed]
    torch.save({"saes": whole, "resumed": again, "histories": histories}, out / f"rank{world.rank}.pt")


@pytest.mark.parametrize("layout", ["data_parallel", "latent_sharded"])
def test_distributed_training_equals_one_process(layout, tmp_path, on_ranks):
    """Data parallel: each rank half of every batch (DDP). Latent sharded: each rank half of the latents,
    whole batches. Either way each rank ends with what one process trains on the whole batches, and a
    run interrupted and resumed from its checkpoint ends bitwise equal to the uninterrupted one."""
    from dictlab.dictionaries.train import TrainConfig, tensor_batches, train_sweep

    x = sae_data()
    worker = _train_on_ranks if layout == "data_parallel" else _train_sharded
    on_ranks(worker, tmp_path, x, tmp_path, tmp_path / "sweep.checkpoint.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = _saes()
    histories = train_sweep(one, tensor_batches(x, 256, seed=1), TrainConfig(**TRAIN), progress=False, log_every=10)
    for i, sae in enumerate(one):
        for name, t in sae.state_dict().items():
            for r in ranks:
                assert torch.equal(r["saes"][i][name], ranks[0]["saes"][i][name]), (SAE_KINDS[i], name)
                assert torch.equal(r["resumed"][i][name], ranks[0]["saes"][i][name]), (SAE_KINDS[i], name)
            torch.testing.assert_close(ranks[0]["saes"][i][name], t, rtol=1e-3, atol=1e-4,
                                       msg=str((SAE_KINDS[i], name)))
        got, want = ranks[0]["histories"][i], histories[i]
        assert [h["step"] for h in got] == [h["step"] for h in want]
        for key in ("mse", "l0", "total", "dead_fraction", *(("aux",) if "aux" in want[0] else ("sparsity",))):
            assert [h[key] for h in got] == pytest.approx([h[key] for h in want], rel=1e-3, abs=1e-6), key
    assert max(h["aux"] for h in histories[0]) > 0  # latents idle for a batch count as dead: AuxK was at work
    assert not list(tmp_path.glob("sweep.checkpoint.pt*"))


def _extract_on_ranks(world, model, corpus, cfg, out):
    from dictlab.data.extract import extract

    extract(model, corpus, cfg, out, progress=False)


def _rows(store, split):
    """Every row of a split keyed by (context, pos), sorted: the same set whatever the shard layout."""
    cols = ("token", "doc", "context", "pos", "L1.mlp_out")
    parts = list(store.batches("L1.resid_post", split, 1 << 16, columns=cols))
    rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.argsort(rows["context"].long() * 10_000 + rows["pos"].long())
    return {k: v[order] for k, v in rows.items()}


def test_distributed_extraction_equals_one_process_and_resumes_per_rank(tiny_models, tmp_path, sentences,
                                                                        write_pile_jsonl_zst, on_ranks):
    from dictlab.data.corpus import CorpusConfig
    from dictlab.data.extract import ExtractConfig, extract
    from dictlab.data.store import Store
    from dictlab.errors import DictlabError

    corpus = CorpusConfig(source=str(write_pile_jsonl_zst(tmp_path / "docs.jsonl.zst", sentences(120, seed=2))),
                          eval_fraction=0.2)
    cfg = ExtractConfig(layers=[1], sites=["resid_post", "mlp_out"], context_length=16, batch_size=3,
                        batches_per_shard=2, train_tokens=700, eval_tokens=200, model_dtype="float32",
                        store_dtype="float32")
    model = str(tiny_models["llama"])
    one = Store(extract(model, corpus, cfg, tmp_path / "one", progress=False))
    on_ranks(_extract_on_ranks, tmp_path, model, corpus, cfg, tmp_path / "two")
    two = Store(tmp_path / "two")
    assert two.manifest["ranks"] == 2 and two.identity == one.identity and two.verify() == []
    assert {s.split("/")[1] for s in two.shards("train")} == {"rank-00000-of-00002", "rank-00001-of-00002"}
    for split in ("train", "eval"):
        assert two.rows(split) == one.rows(split) and two.manifest["splits"][split]["documents"] == \
            one.manifest["splits"][split]["documents"]
        a, b = _rows(one, split), _rows(two, split)
        for k in ("token", "doc", "context", "pos"):
            assert torch.equal(a[k], b[k]), (split, k)
        for k in ("x", "L1.mlp_out"):  # other batches around a context: float rounding at most
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    # each rank loses its last train shard and rank 1 its eval split: a rerun on 2 ranks makes them again
    shards = {s["file"]: s["sha256"] for split in ("train", "eval") for s in two.manifest["splits"][split]["shards"]}
    (tmp_path / "two" / "manifest.json").unlink()
    for rank in (0, 1):
        folder = tmp_path / "two" / "train" / f"rank-0000{rank}-of-00002"
        max(folder.glob("shard-*.safetensors")).unlink()
        (folder / "done.json").unlink()
    for f in (tmp_path / "two" / "eval" / "rank-00001-of-00002").iterdir():
        f.unlink()
    with pytest.raises(DictlabError, match="partly extracted by 2 process"):
        extract(model, corpus, cfg, tmp_path / "two", progress=False)
    on_ranks(_extract_on_ranks, tmp_path, model, corpus, cfg, tmp_path / "two")
    again = Store(tmp_path / "two")
    assert {s["file"]: s["sha256"] for split in ("train", "eval") for s in again.manifest["splits"][split]["shards"]} \
        == shards
    # `store repair` in one process re-extracts damaged shards of rank folders (each rank's own contexts)
    import shutil

    from dictlab.data.repair import repair

    damaged = shutil.copytree(tmp_path / "two", tmp_path / "damaged")
    (damaged / "train" / "rank-00001-of-00002" / "shard-00000.safetensors").write_bytes(bytes(64))
    (damaged / "eval" / "rank-00000-of-00002" / "shard-00000.safetensors").unlink()
    assert repair(damaged, progress=False) == ["train/rank-00001-of-00002/shard-00000.safetensors",
                                               "eval/rank-00000-of-00002/shard-00000.safetensors"]
    files = sorted(p.relative_to(damaged) for p in damaged.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for f in files:
        assert (damaged / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_the_same_yaml_runs_under_torchrun_with_two_processes(tmp_path, pile_dir, tiny_models, write_run_config):
    import json
    import os
    import subprocess
    import sys

    import yaml

    from dictlab.cli import main
    from dictlab.dictionaries import load_dictionary

    fit = [{"method": "kmeans", "k": [3, 5]}, {"method": "gmm", "k": [3], "max_iter": 5},
           {"method": "minibatch_kmeans", "k": [3]},
           {"method": "sae", "latents": [16], "k": 2, "steps": 30, "batch_size": 64, "checkpoint_every": 10},
           {"method": "sae", "latents": [16], "k": 2, "steps": 30, "batch_size": 64, "checkpoint_every": 10,
            "shard_latents": True, "name": "sharded"}]
    config = write_run_config(tmp_path / "c.yaml", "ranks", tiny_models["llama"], pile_dir, train_tokens=1200, fit=fit)
    cfg = yaml.safe_load(config.read_text())
    cfg["extract"]["batches_per_shard"] = 2
    cfg["interpret"] = {"enabled": False}
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "dictlab.cli", "--quiet", "--runs-dir", str(tmp_path / "two"), "run", str(config)]
    done = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results:") == 1 and "kmeans" in done.stdout  # rank 0 alone prints
    assert main(["--quiet", "--runs-dir", str(tmp_path / "one"), "run", str(config)]) == 0
    two, one = tmp_path / "two" / "ranks", tmp_path / "one" / "ranks"
    assert (two / "report.html").exists()
    assert json.loads((two / "store" / "manifest.json").read_text())["ranks"] == 2
    for name in ("kmeans-k3", "kmeans-k5", "gmm-diag-k3"):  # order-free fits equal one process's
        a, b = (load_dictionary(r / "dictionaries" / "L1.resid_post" / name) for r in (one, two))
        torch.testing.assert_close(b.directions, a.directions, rtol=1e-4, atol=1e-4)
        assert json.loads((two / "dictionaries" / "L1.resid_post" / name / "config.json").read_text())["ranks"] == 2
    results = json.loads((two / "results.json").read_text())["results"]
    assert {r["method"] for r in results} == {"kmeans", "gmm", "minibatch_kmeans", "sae-topk"}
    assert sum(r["method"] == "sae-topk" and r["n_latents"] == 16 for r in results) == 2  # the sharded one whole
    assert all(0 < r["fvu"] < 1.5 for r in results)
    assert not list((two / "dictionaries").rglob("*.checkpoint.pt"))


def test_bad_distributed_settings_are_refused_with_what_is_accepted(tmp_path, tiny_models, monkeypatch, capsys,
                                                                    sentences, write_pile_jsonl_zst):
    from dictlab.cli import main
    from dictlab.data.corpus import CorpusConfig
    from dictlab.data.distributed import World
    from dictlab.data.extract import ExtractConfig, extract
    from dictlab.data.store import Store
    from dictlab.dictionaries.sae_fit import local_batch_size
    from dictlab.errors import DictlabError

    with pytest.raises(DictlabError, match="batch_size=100 does not divide among 3 ranks"):
        local_batch_size(100, World(0, 3))
    corpus = CorpusConfig(source=str(write_pile_jsonl_zst(tmp_path / "d.jsonl.zst", sentences(40, seed=1))))
    cfg = ExtractConfig(layers=[1], context_length=16, train_tokens=200, eval_tokens=50, model_dtype="float32")
    store = Store(extract(str(tiny_models["gpt2"]), corpus, cfg, tmp_path / "s", progress=False))
    with pytest.raises(DictlabError, match=r"has 1 shard\(s\) for 99 ranks"):
        next(store.batches("L1.resid_post", "train", 64, world=World(0, 99)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["store", "info", str(tmp_path / "s")]) == 2
    assert "only run, extract, fit split their work" in capsys.readouterr().err
